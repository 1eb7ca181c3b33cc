"""DeCLIP: a ViT image tower, a causal text transformer, SimSiam heads and an MLM head.

Written out by hand rather than built from open_clip's or timm's towers,
because a faithful DeCLIP needs things those towers do not give together:
the reference's exact init (the same scheme in both towers, positional
embeddings N(0, 0.01)), a patch embedding frozen at its random init, a text
projection that is a Linear *with* bias over a 49409-id vocabulary, and one
attention path (`scaled_dot_product_attention`, fused kernels on every
backend) for both towers. Parameter names follow OpenAI CLIP
(`visual.conv1`, `transformer.resblocks.N.attn.in_proj_weight`, `ln_final`,
...) so OpenAI and reference DeCLIP checkpoints map by name.

Layout is batch-first (B, L, D) throughout. Build on CPU and move: init draws
from torch's CPU RNG, which `build_model` seeds with `train.seed` (without
disturbing the caller's RNG), so a config gives the same weights on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from declip.config import RunConfig, as_config


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.width, self.layers = width, layers
        blocks = [ResidualAttentionBlock(width, heads, mlp_ratio, causal) for _ in range(layers)]
        self.resblocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)

    def init_weights(self) -> None:
        """Reference (OpenAI CLIP) scheme; biases: in/out-proj zero (as nn.MultiheadAttention),
        MLP biases keep nn.Linear's default (as the reference)."""
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float, embed_dim: int
    ):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def init_weights(self) -> None:
        # conv1 keeps nn.Conv2d's default (kaiming-uniform) init, as the reference; frozen, it stays there.
        scale = self.transformer.width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def simsiam_projector(dim: int, hidden: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN, as the reference (biases and affine BNs kept)."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
    )  # fmt: skip


def simsiam_predictor(hidden: int, bottleneck: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(inplace=True),
        nn.Linear(bottleneck, hidden),
    )  # fmt: skip


class DeCLIP(nn.Module):
    """Image tower `visual`, the text tower at top level (OpenAI CLIP's layout), optional heads.

    `projector`/`predictor` exist only when SimSiam is on and `text_mlm_head`
    only when MLM is on; heads keep PyTorch's default Linear/BatchNorm init,
    as the reference.
    """

    def __init__(self, cfg: RunConfig):
        super().__init__()
        m, loss = cfg.model, cfg.loss
        self.logit_scale_max = m.logit_scale_max
        self.visual = VisionTransformer(
            m.image_size, m.patch_size, m.vision_width, m.vision_layers, m.vision_heads, m.mlp_ratio, m.embed_dim
        )
        self.token_embedding = nn.Embedding(m.vocab_size, m.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(m.context_length, m.text_width))
        self.transformer = Transformer(m.text_width, m.text_layers, m.text_heads, m.mlp_ratio, causal=True)
        self.ln_final = nn.LayerNorm(m.text_width)
        self.text_projection = nn.Linear(m.text_width, m.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(m.logit_scale_init)))
        self.projector = simsiam_projector(m.embed_dim, m.simsiam_dim) if loss.simsiam_weight > 0 else None
        self.predictor = simsiam_predictor(m.simsiam_dim, m.simsiam_pred_dim) if loss.simsiam_weight > 0 else None
        self.text_mlm_head = nn.Linear(m.text_width, m.vocab_size) if loss.mlm_weight > 0 else None

        self.visual.init_weights()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection.weight, std=m.text_width**-0.5)
        # The reference freezes the patch projection at its random init (MoCo v3's stability trick).
        self.visual.conv1.weight.requires_grad_(not m.freeze_patch_embed)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), unnormalised."""
        return self.visual(images)

    def text_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, text_width): final-LayerNorm token states of the causal transformer."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x))

    def pool_text(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Project the state at the EOT (the highest id, 49408) of each caption."""
        return self.text_projection(states[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, embed_dim), unnormalised."""
        return self.pool_text(self.text_states(tokens), tokens)

    def forward(
        self, images: list[torch.Tensor], texts: list[torch.Tensor], mlm_mask: torch.Tensor | None = None
    ) -> dict:
        """Views of one batch -> the objective's inputs (see docs/architecture.md).

        All image views go through the tower in one call (likewise the text
        views): one large batch uses the device better than several small ones.
        """
        B = images[0].shape[0]
        image_features = list(self.encode_image(torch.cat(images)).split(B))
        tokens = torch.cat(texts)
        states = self.text_states(tokens)
        out = {
            "image_features": image_features,
            "text_features": list(self.pool_text(states, tokens).split(B)),
            "logit_scale": self.logit_scale.exp().clamp(max=self.logit_scale_max),
        }
        if self.projector is not None:
            # Per view, so each view gets its own BatchNorm statistics (as the reference).
            zs = [self.projector(f) for f in image_features]
            out["simsiam"] = [(self.predictor(z), z) for z in zs]
        if self.text_mlm_head is not None and mlm_mask is not None:
            # Only the chosen positions of the masked caption (texts[0]): ~1/7 of the full head's cost.
            out["mlm_logits"] = self.text_mlm_head(states[:B][mlm_mask])
        return out


def build_model(config: RunConfig | dict) -> DeCLIP:
    """The DeCLIP of a run config, initialised from `train.seed`; heads only for the loss terms that are on."""
    cfg = as_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return DeCLIP(cfg)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
