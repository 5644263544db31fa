"""A trained Hugging Face ViT for the tests: the shipped digits ViT (timm, snp_fast/data/digits_vit.safetensors)
carried over weight for weight into transformers' ViTForImageClassification (same architecture: 8x8 one-channel
images, patch 2, width 128, 6 layers of 4 heads, class-token classifier), so the HF family is measured on a
trained model without another weights file."""
import torch


def hf_vit_from_timm(model: torch.nn.Module):
    """transformers ViTForImageClassification with a plain timm VisionTransformer's weights (class-token pooling,
    fused qkv split into q_proj / k_proj / v_proj)."""
    from transformers import ViTConfig, ViTForImageClassification
    D, H = model.embed_dim, model.blocks[0].attn.num_heads
    config = ViTConfig(image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                       num_channels=model.patch_embed.proj.in_channels, hidden_size=D, num_hidden_layers=len(model.blocks),
                       num_attention_heads=H, intermediate_size=model.blocks[0].mlp.fc1.out_features,
                       num_labels=model.num_classes, layer_norm_eps=model.norm.eps, hidden_act='gelu',
                       qkv_bias=model.blocks[0].attn.qkv.bias is not None)
    hf = ViTForImageClassification(config).eval()
    sd = model.state_dict()
    new = {'vit.embeddings.cls_token': sd['cls_token'], 'vit.embeddings.position_embeddings': sd['pos_embed'],
           'vit.embeddings.patch_embeddings.projection.weight': sd['patch_embed.proj.weight'],
           'vit.embeddings.patch_embeddings.projection.bias': sd['patch_embed.proj.bias'],
           'vit.layernorm.weight': sd['norm.weight'], 'vit.layernorm.bias': sd['norm.bias'],
           'classifier.weight': sd['head.weight'], 'classifier.bias': sd['head.bias']}
    for i in range(len(model.blocks)):
        b, p = f'blocks.{i}.', f'vit.layers.{i}.'
        for t in ('weight', 'bias'):
            q, k, v = sd[b + f'attn.qkv.{t}'].chunk(3)
            new.update({p + f'attention.q_proj.{t}': q, p + f'attention.k_proj.{t}': k, p + f'attention.v_proj.{t}': v,
                        p + f'attention.o_proj.{t}': sd[b + f'attn.proj.{t}'],
                        p + f'layernorm_before.{t}': sd[b + f'norm1.{t}'], p + f'layernorm_after.{t}': sd[b + f'norm2.{t}'],
                        p + f'mlp.fc1.{t}': sd[b + f'mlp.fc1.{t}'], p + f'mlp.fc2.{t}': sd[b + f'mlp.fc2.{t}']})
    hf.load_state_dict(new, strict=True)
    return hf


def digits_hf_vit():
    from snp_fast.demo import load_digits_vit
    return hf_vit_from_timm(load_digits_vit())
