"""Enrollment: new classes from a few images each, without retraining, into a new model
directory (the old one is never changed).

A new class's row in every class classifier the prediction runs is made from the mean of the
class's embeddings at that classifier's input (`embed.watch_classifiers`): the unit mean
direction, scaled to the mean norm of the trained rows. A linear layer's bias is the mean of
the trained biases; a cosine head (any number of sub-centres) and a prototype head get that
direction as each of the class's rows / prototypes, so the new class's logit is the scaled
cosine to its mean embedding, like the trained classes'. Classifiers the prediction does not
run (none of the built-in methods' saved ones) get the mean of their trained rows. Any other
tensor whose shape follows the class count refuses the enrollment, naming it.

model.json keeps the base model's record (config, preprocessing, metrics: those measured
before enrollment) with the longer class list and `enrolled`: each class, its image count and
the base model's weights SHA-256. A gallery of the base model is carried over to the new
directory with the enrollment images added as references (`gallery.extend_gallery`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.embeddings import image_files
from lookcloser.errors import (
    SKIP_BAD_IMAGES_HINT,
    BadImagesError,
    ConfigError,
    DataError,
    ModelDirError,
)
from lookcloser.lookalikes.gallery import (
    GALLERY_DIR,
    Gallery,
    GalleryBuilt,
    extend_gallery,
    find_gallery,
    load_gallery,
)
from lookcloser.models.embedding import is_classifier, watch_classifiers
from lookcloser.models.heads import CosineHead, PrototypeHead


@dataclass
class EnrollResult:
    """What `enroll` wrote."""

    model_dir: Path
    classes: dict[str, int]  # new class -> images it was enrolled from
    skipped: list[tuple[str, str]]
    gallery: GalleryBuilt | None = None  # the base gallery carried over, with the new images
    gallery_note: str | None = None  # why a gallery in MODEL_DIR was not carried over


def class_folders(folder: str | Path) -> dict[str, list[str]]:
    """{class: image files} of a folder of class folders (each searched recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of class folders")
    found = {
        p.name: [str(f) for f in image_files([p])] for p in sorted(folder.iterdir()) if p.is_dir()
    }
    if not found:
        raise DataError(f"{folder}: no class folders (expected FOLDER/<class>/*.jpg)")
    return found


def check_new_classes(existing: Sequence[str], new: Mapping[str, Sequence[str]], where: str):
    """ConfigError for a class name that exists, is empty or has no images."""
    if not new:
        raise ConfigError("enroll: no class to enroll (--class NAME IMAGES..., or --folder DIR)")
    for name, images in new.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"--class {name!r}: expected a class name without outer spaces")
        if name in existing:
            raise ConfigError(
                f"--class {name!r}: {where} already has a class of that name; enrollment adds "
                "new classes only (choose another name)"
            )
        if not images:
            raise DataError(f"--class {name!r}: no images")


def _class_inputs(
    predictor, files: Sequence[str], batch_size: int, on_bad_image: str
) -> tuple[dict[str, Tensor], dict[str, int], str | None, list[tuple[str, str]]]:
    """Per classifier layer called at inference: the sum of the unit inputs of the last call
    on a batch-wide 2-D input; the image count per layer; the decision layer; bad files."""
    from lookcloser.data.files import file_loader

    loader = file_loader(files, predictor.transform, predictor.max_pixels, batch_size)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    decision: str | None = None
    exact = True
    skipped: list[tuple[str, str]] = []
    method = predictor.method
    for indices, images, failures in loader:
        skipped += [(files[i], reason) for i, reason in failures]
        if not indices:
            continue
        images = images.to(predictor.device)
        meta, mask = predictor._meta_inputs(len(images), None, None)
        with torch.inference_mode(), watch_classifiers(method) as calls:
            logits = method(images, meta, mask)
        last: dict[str, Tensor] = {}
        for call in calls:
            if call.inputs.dim() == 2 and len(call.inputs) == len(images):
                last[call.name] = call.inputs
            if call.output is logits:
                decision = call.name
        if not any(call.output is logits for call in calls):
            exact = False
        for name, inputs in last.items():
            unit = F.normalize(inputs.float(), dim=1).sum(0).cpu()
            sums[name] = sums[name] + unit if name in sums else unit
            counts[name] = counts.get(name, 0) + len(inputs)
    if not exact:
        decision = None
    return sums, counts, decision, skipped


def _grown_rows(
    module: nn.Module, direction: Tensor | None, new: int, means: Tensor | None = None
) -> dict[str, Tensor]:
    """The classifier's tensors with `new` classes' rows appended (from `direction`: a
    (new x D) matrix of mean embeddings; None: the mean of the trained rows).

    Cosine and prototype rows: the unit direction at the trained rows' mean norm. Linear
    rows: the trained rows' mean plus the unit direction at the trained rows' mean distance
    from it. Trained linear rows share a large common part (on cars50: their sum points
    against the mean feature, cosine -0.81), which adds the same to every trained logit; a
    new row needs it too, or its logits live on another scale."""
    if isinstance(module, PrototypeHead):
        weight, per_class = module.prototypes, module.per_class
        key = "prototypes"
    elif isinstance(module, CosineHead):
        weight, per_class, key = module.weight, module.subcenters, "weight"
    else:
        weight, per_class, key = module.weight, 1, "weight"
    weight = weight.detach().float().cpu()
    if direction is None:
        rows = weight.mean(0, keepdim=True).expand(new * per_class, -1)
    elif isinstance(module, nn.Linear):
        common = weight.mean(0, keepdim=True)
        spread = (weight - common).norm(dim=1).mean()
        if means is not None:  # the trained rows' reach along their own classes' directions
            known = means.norm(dim=1) > 0
            own = F.normalize(means[known] - means[known].mean(0, keepdim=True), dim=1)
            spread = ((weight[known] - common) * own).sum(1).mean().clamp_min(1e-6)
        rows = common + F.normalize(direction, dim=1) * spread
    else:
        scale = weight.norm(dim=1).mean()
        rows = (F.normalize(direction, dim=1) * scale).repeat_interleave(per_class, dim=0)
    out = {key: torch.cat([weight, rows.to(weight.dtype)])}
    if isinstance(module, nn.Linear) and module.bias is not None:
        bias = module.bias.detach().float().cpu()
        out["bias"] = torch.cat([bias, bias.mean().expand(new)])
    return out


def enrolled_state(
    predictor,
    new: Mapping[str, Sequence[str]],
    batch_size: int = 32,
    on_bad_image: str = "error",
    reference_mean: Tensor | None = None,
    reference_means: Tensor | None = None,
):
    """The base model's weights with the new classes' rows added to its classifiers; the
    images each class was enrolled from; the files skipped; the new class list
    (`class_order`); what linear rows were centred on.

    Linear heads read features that share a large common direction (pooled activations are
    mostly positive), and their trained rows tell classes apart by their differences: a row
    along a class's plain mean embedding outscores every trained class on every image
    (docs/benchmarks.md, look-alikes: 0 % on the trained classes). So a linear row's
    direction is the class mean less `reference_mean` (the gallery's mean embedding, for the
    decision layer), else less the mean of the enrolled classes' means (two or more), added
    to the trained rows' common part (`_grown_rows`); cosine and prototype rows take the
    plain mean, like the trained ones."""
    method = predictor.method
    name = getattr(method, "name", "?")
    old = len(predictor.classes)
    directions: dict[str, list[Tensor]] = {}
    used: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    layers: set[str] = set()
    for cls, files in new.items():
        sums, counts, decision, bad = _class_inputs(
            predictor, list(files), batch_size, on_bad_image
        )
        skipped += bad
        if decision is None:
            raise ConfigError(
                f"enroll: method {name!r} predicts from several class heads' summed logits "
                "(e.g. method.predict_from=sum), so no single embedding makes its decision; "
                "enrollment needs a model with one (method.predict_from=last or fusion)"
            )
        if not counts:
            raise DataError(f"--class {cls!r}: none of its {len(files)} image(s) could be read")
        layers |= set(sums)
        for layer, total in sums.items():
            directions.setdefault(layer, []).append(total / counts[layer])
        used[cls] = counts[decision]
    if skipped and on_bad_image == "error":
        total = sum(len(f) for f in new.values())
        raise BadImagesError(skipped, total, SKIP_BAD_IMAGES_HINT.replace("predict", "enroll"))
    state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    classes, order = class_order(list(predictor.classes), list(new))
    grown: dict[str, Tensor] = {}
    centred = "none"
    for layer, module in method.named_modules():
        if not is_classifier(module, old):
            continue
        rows = torch.stack(directions[layer]) if layer in layers else None
        if rows is not None and isinstance(module, nn.Linear):
            if reference_mean is not None and layer == decision:
                rows, centred = rows - reference_mean, "the gallery's mean embedding"
            elif len(new) >= 2:
                rows = rows - rows.mean(0, keepdim=True)
                if layer == decision:
                    centred = "the mean of the enrolled classes' mean embeddings"
        means = reference_means if isinstance(module, nn.Linear) and layer == decision else None
        for key, tensor in _grown_rows(module, rows, len(new), means).items():
            # the class rows in the new class order (each class's sub-centres together)
            blocks = tensor.reshape(len(order), -1, *tensor.shape[1:])[order]
            grown[f"{layer}.{key}" if layer else key] = blocks.reshape(tensor.shape)
    state.update(grown)
    _check_shapes(predictor, state, len(new), name)
    return state, used, skipped, classes, centred


def class_order(old: list[str], new: list[str]) -> tuple[list[str], Tensor]:
    """The enrolled model's class list and, per position, the index into old + new: sorted
    by name when the base model's classes were (an ImageFolder tree's order, so `eval` on a
    tree holding every class reads the same order), else the new classes after the old."""
    names = [*old, *new]
    if old == sorted(old):
        order = sorted(range(len(names)), key=lambda i: names[i])
    else:
        order = list(range(len(names)))
    return [names[i] for i in order], torch.tensor(order)


def _check_shapes(predictor, state: dict[str, Tensor], new: int, name: str) -> None:
    """ConfigError when a tensor that follows the class count was not grown."""
    from lookcloser.config import Config
    from lookcloser.methods import build_method

    cfg = Config.from_dict(predictor.info["config"])
    cfg.model.pretrained = False
    cfg.model.weights = None
    record = predictor.info
    cfg.method = {
        **({"module": cfg.method["module"]} if cfg.method.get("module") else {}),
        "name": record["method"],
        **record.get("method_options", {}),
    }
    cfg.data.meta_keys = list(record.get("meta_keys", []))
    with torch.device("meta"):
        bare = build_method(cfg, len(predictor.classes) + new, pretrained=False).for_inference()
    for key, tensor in bare.state_dict().items():
        if key not in state or tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"enroll: method {name!r}: tensor {key} {tuple(tensor.shape)} follows the class "
                "count and is not a class classifier enrollment can extend"
            )


def enroll(
    model_dir: str | Path,
    new: Mapping[str, Sequence[str | Path]],
    out: str | Path,
    batch_size: int = 32,
    on_bad_image: str = "error",
    gallery: bool = True,
) -> EnrollResult:
    """Write a new model directory `out`: the model of `model_dir` with the classes of `new`
    ({name: image files or folders}) enrolled; `model_dir` is left as it is. With `gallery`
    and a gallery in `model_dir`, `out/gallery` holds it and the new classes' images."""
    from lookcloser.modeldir import is_model_dir, save_model_dir
    from lookcloser.predictor import Predictor

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: exists and is not an empty folder; enrollment writes a new model "
            "directory (the old one is never changed)"
        )
    if is_model_dir(out) or out.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out}: the model directory itself; choose a new folder")
    predictor = Predictor.load(model_dir, tta="none")
    check_new_classes(predictor.classes, new, str(model_dir / "model.json"))
    files = {name: image_files(paths) for name, paths in new.items()}
    base_gallery, note = _base_gallery(model_dir, predictor)
    mean, means = _gallery_means(base_gallery, predictor)
    state, used, skipped, classes, centred = enrolled_state(
        predictor, files, batch_size, on_bad_image, mean, means
    )
    record = dict(predictor.info)
    for key in ("format", "format_version", "weights", "versions", "created"):
        record.pop(key, None)
    previous = record.get("enrolled", {}).get("classes", [])
    record["classes"] = classes
    if "num_classes" in record:
        record["num_classes"] = len(record["classes"])
    record["enrolled"] = {
        "base_weights_sha256": predictor.info["weights"]["sha256"],
        "base_classes": len(predictor.classes) - len(previous),
        "classes": [*previous, *({"name": n, "images": used[n]} for n in new)],
        "linear_rows_centred_on": centred,
        "note": "metrics are the base model's, measured before enrollment",
    }
    save_model_dir(out, state, record)
    enrolled = _check_loads(out)
    carried = None
    if gallery and base_gallery is not None:  # the model directory is complete already
        carried = extend_gallery(
            base_gallery, enrolled, files, out / GALLERY_DIR, batch_size, on_bad_image
        )
    elif base_gallery is not None:
        note = "not carried over (gallery=False)"
    return EnrollResult(out, used, skipped, carried, note)


def _base_gallery(model_dir: Path, predictor) -> tuple[Gallery | None, str | None]:
    """The model directory's gallery when it has one built for it, else None and why not
    (None without one)."""
    folder = find_gallery(model_dir)
    if folder is None:
        return None, None
    try:
        return load_gallery(folder, predictor), None
    except ModelDirError as err:
        return None, f"not used or carried over: {err}"


def _gallery_means(gallery: Gallery | None, predictor) -> tuple[Tensor | None, Tensor | None]:
    """The mean embedding of the gallery and its per-class means (rows of 0 for classes
    without references); (None, None) without references."""
    if gallery is None or not len(gallery):
        return None, None
    embeddings = torch.from_numpy(gallery.embeddings)
    labels = torch.from_numpy(gallery.labels)
    sums = torch.zeros(len(predictor.classes), embeddings.shape[1])
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=len(predictor.classes)).clamp_min(1)
    return embeddings.mean(0), sums / counts[:, None]


def _check_loads(out: Path):
    """The new directory's Predictor: it loads like any model directory (ModelDirError
    otherwise)."""
    from lookcloser.predictor import Predictor

    try:
        return Predictor.load(out, tta="none")
    except ModelDirError as err:  # pragma: no cover - a bug: the state was checked
        raise ModelDirError(f"{out}: the enrolled model does not load: {err}") from None
