"""Dynamic Capacity Networks (Almahairi et al., ICML 2016).

A cheap network looks at the whole image; an expensive one looks only where it matters:

* **Coarse pass.** The coarse network (`method.coarse_backbone`, on the image resized by
  `method.coarse_scale`, up to `method.coarse_stage`) gives a feature map, brought to the
  grid of `method.patch_size` cells of the input; a linear adapter maps each cell's vector to
  the fine network's width. These are the coarse representation vectors c_ij.
* **Top layers g.** Shared by both paths: a per-cell linear layer with ReLU, the mean over
  cells, and the class head. g on the coarse vectors gives the coarse prediction.
* **Saliency.** The norm, per cell, of the gradient of the coarse prediction's entropy with
  respect to c_ij (the paper's attention signal): cells whose vector could most change how
  unsure the model is. Written out in closed form (no autograd), so it runs in the exported
  graph too; a test checks it against autograd.
* **Fine pass.** The `method.glimpses` most salient cells are cut from the input at full
  resolution and go through the fine network (`model.backbone`); its pooled features replace
  the coarse vectors there, and g classifies the refined grid.
* **Loss.** Cross-entropy of the refined prediction, plus the hint term: the squared distance
  between the coarse and fine vectors of the chosen cells, which trains the coarse path alone
  (the fine vectors are detached), so that both kinds of vector mean the same to g.

The fine network never sees the whole image, so inference costs the coarse pass plus
`glimpses` patches instead of the fine network on every pixel (docs/methods.md measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import DCNOptions
from lookcloser.methods.ramstrans import draw_boxes
from lookcloser.methods.tasn import AttentionNet
from lookcloser.models.backbones import Backbone, BackboneFactory
from lookcloser.models.gradients import has_input_gradient, input_gradient
from lookcloser.models.heads import HeadSpec
from lookcloser.models.modes import eval_mode
from lookcloser.models.plugins import is_token_model


# ---- cells and patches ----------------------------------------------------------------------------
def cell_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """(rows, columns) of `patch`-pixel cells; a ConfigError unless they tile the image."""
    if height % patch or width % patch:
        raise ConfigError(
            f"method.patch_size={patch}: the {height} x {width} input is not a whole number of "
            "patches; choose a patch size that divides data.image_size"
        )
    return height // patch, width // patch


def cell_patches(images: Tensor, patch: int) -> Tensor:
    """B x N x 3 x P x P: the image's cells in raster order (a reshape, no copy of pixels
    beyond the permute)."""
    b, c = images.shape[:2]
    rows, cols = cell_grid(int(images.shape[-2]), int(images.shape[-1]), patch)
    grid = images.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(b, rows * cols, c, patch, patch)


def to_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """A B x C x h x w map at the cell grid: average pooling when it is a whole multiple of
    the grid, bilinear resizing otherwise (both export to ONNX)."""
    h, w = int(features.shape[-2]), int(features.shape[-1])
    if (h, w) == tuple(grid):
        return features
    if h % grid[0] == 0 and w % grid[1] == 0:
        kernel = (h // grid[0], w // grid[1])
        return F.avg_pool2d(features, kernel, kernel)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def gather_cells(values: Tensor, index: Tensor) -> Tensor:
    """B x k x ...: the rows `index` (B x k) of B x N x ... values."""
    shape = (*index.shape, *values.shape[2:])
    expanded = index.reshape(*index.shape, *([1] * (values.ndim - 2))).expand(shape)
    return torch.gather(values, 1, expanded)


def replace_cells(coarse: Tensor, index: Tensor, fine: Tensor) -> Tensor:
    """B x N x D: the coarse vectors with rows `index` (B x k) replaced by `fine` (B x k x D)."""
    chosen = torch.zeros_like(coarse[..., 0]).scatter(1, index, 1.0)[..., None]
    placed = torch.zeros_like(coarse).scatter(1, index[..., None].expand_as(fine), fine)
    return coarse * (1 - chosen) + placed


def cell_boxes(index: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """B x k x 4 pixel boxes (xyxy) of the cells `index` on a grid of `patch`-pixel cells."""
    row = torch.div(index, grid[1], rounding_mode="floor")
    col = index - row * grid[1]
    x0, y0 = (col * patch).float(), (row * patch).float()
    return torch.stack([x0, y0, x0 + patch, y0 + patch], dim=-1)


def top_cells(saliency: Tensor, k: int) -> Tensor:
    """B x k indices of the most salient cells; equal saliencies go to the earlier cell (in
    PyTorch and ONNX Runtime alike: a shift of a millionth of the peak per cell decides)."""
    n = saliency.shape[1]
    order = torch.arange(n, device=saliency.device, dtype=saliency.dtype)
    peak = saliency.amax(1, keepdim=True).clamp_min(1e-30)
    return torch.topk(saliency - order * (1e-6 * peak / n), k, dim=1).indices


# ---- top layers and saliency -----------------------------------------------------------------------
def entropy_saliency(vectors: Tensor, top: nn.Linear, head: nn.Module) -> tuple[Tensor, Tensor]:
    """Per cell, ||dH/dc_ij||, and the logits of g on `vectors` (B x N x D).

    g(c) = head(mean_ij relu(top(c_ij))); H is the entropy of softmax(g(c)). With p the class
    probabilities, dH/dz = -p (log p + H); back through the head (its closed-form input
    gradient: the weights of a linear head, see models.gradients.input_gradient), the mean over
    the N cells, the ReLU's mask and the top layer's weights gives dH/dc_ij in closed form.
    The head runs without metadata: the saliency picks image cells from the image alone.
    """
    pre = top(vectors)
    pooled = F.relu(pre).mean(1)
    logits = head(pooled)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1, keepdim=True)
    d_logits = -p * (log_p + entropy)  # B x K
    d_pooled = input_gradient(head, pooled.float(), d_logits)  # B x T
    d_hidden = d_pooled[:, None] * (pre > 0).float() / vectors.shape[1]  # B x N x T
    d_vectors = d_hidden @ top.weight.float()  # B x N x D
    return d_vectors.norm(dim=-1).to(vectors.dtype), logits


# ---- the method -------------------------------------------------------------------------------------
@dataclass
class Glimpses:
    """One pass: coarse vectors (B x N x D), saliency (B x N), chosen cells (B x k), the fine
    vectors there (B x k x D), the refined vectors (B x N x D) and the cell grid."""

    coarse: Tensor
    saliency: Tensor
    index: Tensor
    fine: Tensor
    refined: Tensor
    grid: tuple[int, int]
    coarse_logits: Tensor


@register_method
class DCN(Method):
    """Coarse network everywhere, entropy-gradient saliency, fine network on the top-k cells."""

    name = "dcn"
    Options = DCNOptions

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: DCNOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
        coarse_backbone: Backbone | None = None,
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        opts: DCNOptions = self.options
        if coarse_backbone is None:
            raise ConfigError("method dcn: build it with DCN.build (it needs two networks)")
        if is_token_model(backbone.model):
            raise ConfigError(
                f"method dcn: model.backbone must be a CNN; {backbone.name!r} is a transformer "
                "with a fixed input size, and DCN's fine network classifies "
                f"{opts.patch_size}-pixel patches"
            )
        if is_token_model(coarse_backbone.model):
            raise ConfigError(
                f"method dcn: method.coarse_backbone must be a CNN; {coarse_backbone.name!r} is "
                "a transformer"
            )
        self.coarse_net = AttentionNet(coarse_backbone, opts.coarse_stage, 0)
        width = backbone.num_features
        self.adapter = nn.Linear(self.coarse_net.channels, width)
        self.top = nn.Linear(width, opts.top_channels)
        self.head = self.make_head(opts.top_channels)
        if not has_input_gradient(getattr(self.head, "classifier", self.head)):
            raise ConfigError(
                f"method dcn: the entropy-gradient saliency needs the class head's input "
                f"gradient in closed form (models.gradients.input_gradient); model.head="
                f"{self.head_type} has none"
            )

    @classmethod
    def build(
        cls,
        make_backbone: BackboneFactory,
        num_classes: int,
        options: DCNOptions,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ) -> DCN:
        """The fine network from `model.*`; the coarse one from `method.coarse_backbone`
        (without model.attention / model.stn plug-ins: it is the cheap path)."""
        coarse = make_backbone(
            options.coarse_backbone or None,
            attention="none",
            stn=False,
            drop_rate=0.0,
            drop_path_rate=0.0,
        )
        return cls(make_backbone(), num_classes, options, head, meta_keys, coarse)

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int | None:
        """data.image_size; setting it checks that the patches tile it and k fits."""
        return self.__dict__.get("_image_size")

    @image_size.setter
    def image_size(self, size: int | None) -> None:
        self.__dict__["_image_size"] = size
        if size:
            self._check_grid(cell_grid(size, size, self.options.patch_size))

    def _check_grid(self, grid: tuple[int, int]) -> None:
        cells = grid[0] * grid[1]
        if self.options.glimpses > cells:
            raise ConfigError(
                f"method.glimpses={self.options.glimpses}: the input has only {cells} patches "
                f"of {self.options.patch_size} px ({grid[0]} x {grid[1]})"
            )

    # ---- the passes -------------------------------------------------------------------------------
    def coarse_vectors(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """B x N x D: the coarse network's map at the cell grid, adapted to the fine width."""
        scale = self.options.coarse_scale
        if scale != 1.0:
            size = (
                max(1, round(int(images.shape[-2]) * scale)),
                max(1, round(int(images.shape[-1]) * scale)),
            )
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        features = to_grid(self.coarse_net(images), grid)
        return self.adapter(features.flatten(2).transpose(1, 2))

    def fine_vectors(self, patches: Tensor) -> Tensor:
        """B x k x D: the fine network's pooled features of B x k x 3 x P x P patches."""
        b, k = patches.shape[:2]
        flat = patches.reshape(b * k, *patches.shape[2:])
        return self.backbone.pool(self.backbone.forward_features(flat)).view(b, k, -1)

    def glimpse(self, images: Tensor) -> Glimpses:
        """Coarse pass, saliency, top-k cells, fine pass, refined vectors."""
        opts: DCNOptions = self.options
        # Sizes as plain ints: an exported graph is traced at the model's fixed input size.
        grid = cell_grid(int(images.shape[-2]), int(images.shape[-1]), opts.patch_size)
        self._check_grid(grid)
        coarse = self.coarse_vectors(images, grid)
        saliency, coarse_logits = entropy_saliency(coarse.detach(), self.top, self.head)
        saliency = saliency.detach()
        index = top_cells(saliency, opts.glimpses)
        fine = self.fine_vectors(gather_cells(cell_patches(images, opts.patch_size), index))
        refined = replace_cells(coarse, index, fine)
        return Glimpses(coarse, saliency, index, fine, refined, grid, coarse_logits)

    def classify(
        self, vectors: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """g: logits of B x N x D cell vectors (and the metadata, with model.fusion)."""
        return self.apply_head(self.head, F.relu(self.top(vectors)).mean(1), meta, meta_mask)

    # ---- inference path ---------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """The refined representation as a B x D x rows x columns map (what g reads)."""
        looked = self.glimpse(images)
        b, _, d = looked.refined.shape
        return looked.refined.transpose(1, 2).reshape(b, d, *looked.grid)

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """g on the refined map."""
        return self.classify(features.flatten(2).transpose(1, 2), meta, meta_mask)

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """'loss' = CE(refined) + hint_weight x hint + coarse_weight x CE(coarse)."""
        opts: DCNOptions = self.options
        looked = self.glimpse(batch.images)
        smooth, meta, meta_mask = opts.label_smoothing, batch.meta, batch.meta_mask
        refined = self.class_loss(
            self.classify(looked.refined, meta, meta_mask), batch.targets, smooth
        )
        # The hint trains the coarse path only: the fine vectors are its fixed targets.
        hint = F.mse_loss(gather_cells(looked.coarse, looked.index), looked.fine.detach())
        loss = refined + opts.hint_weight * hint
        parts = {"refined": refined, "hint": hint}
        if opts.coarse_weight > 0:
            coarse = self.class_loss(
                self.classify(looked.coarse, meta, meta_mask), batch.targets, smooth
            )
            loss = loss + opts.coarse_weight * coarse
            parts["coarse"] = coarse
        return {"loss": loss, **parts}

    def new_modules(self) -> list[nn.Module]:
        """The adapter and the top layers are new; both networks are pretrained."""
        return [self.adapter, self.top, self.head]

    # ---- explain ----------------------------------------------------------------------------------
    def _explained(self, images: Tensor) -> Glimpses:
        with eval_mode(self), torch.no_grad():
            return self.glimpse(images)

    def attention_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta=None,
        meta_mask=None,
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """`entropy-saliency` (the coarse model's per-cell saliency that chose the glimpses,
        divided by its max) and Grad-CAM over the refined map."""
        self.check_part(part)
        looked = self._explained(images)
        b = images.shape[0]
        cells = looked.saliency.view(b, 1, *looked.grid)
        peak = cells.flatten(1).amax(1).clamp_min(1e-12).view(b, 1, 1, 1)
        saliency = F.interpolate(cells / peak, size=images.shape[-2:], mode="nearest")[:, 0]
        cam = self.attention(images, target, meta, meta_mask)
        return {"entropy-saliency": saliency.clamp(0, 1), "grad-cam": cam}

    def views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """The input with the cells the fine network looked at outlined."""
        self.check_part(part)
        looked = self._explained(images)
        boxes = cell_boxes(looked.index, looked.grid, self.options.patch_size).to(images.dtype)
        drawn = images
        for i in range(boxes.shape[1]):
            drawn = draw_boxes(drawn, boxes[:, i], width=1)
        return {f"glimpses (k = {boxes.shape[1]})": drawn}
