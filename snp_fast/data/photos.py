"""Real photos shipped with scikit-learn and scikit-image, as a default calibration set when no data is given."""
import torch
import torch.nn.functional as F

__all__ = ['sample_photos']


def sample_photos(size: int = 224) -> torch.Tensor:
    """Real photos that ship with scikit-learn and scikit-image, ImageNet-normalised, (N, 3, size, size)."""
    import numpy as np
    images = []
    from sklearn.datasets import load_sample_images
    images += list(load_sample_images().images)
    try:
        from skimage import data as skdata
        for name in ('astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle_left', 'immunohistochemistry'):
            try:
                images.append(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 -- a missing sample just means one photo fewer
                pass
    except ImportError:
        pass
    out = []
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for im in images:
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        t = torch.tensor(im[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0
        s = min(t.shape[1:])
        top, left = (t.shape[1] - s) // 2, (t.shape[2] - s) // 2
        t = F.interpolate(t[:, top:top + s, left:left + s].unsqueeze(0), size=(size, size), mode='bilinear',
                          align_corners=False, antialias=True)[0]
        out.append((t - mean) / std)
    return torch.stack(out)
