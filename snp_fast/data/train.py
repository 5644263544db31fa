"""The training loop that made the shipped fixtures, and the accuracy they are measured by."""
import torch
import torch.nn.functional as F

__all__ = ['train_classifier', 'accuracy']


def train_classifier(model, x_tr, y_tr, epochs: int, seed: int, batch_size: int, lr: float, augment=None) -> None:
    """The fixtures' training loop (in place): AdamW + one-cycle schedule, shuffled batches from a seeded
    generator; `augment(x_batch, generator)`, if given, transforms each batch after its indices are drawn."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            xb = x_tr[idx] if augment is None else augment(x_tr[idx], gen)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum((model(x[s:s + batch_size]).argmax(-1) == y[s:s + batch_size]).sum().item()
                  for s in range(0, len(y), batch_size))
    return correct / len(y)
