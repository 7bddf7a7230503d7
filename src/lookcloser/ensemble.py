"""Ensembles: model directories whose class probabilities are averaged with fitted weights.

An ensemble directory holds `ensemble.json` and a copy of each member's model directory
(model.json + model.safetensors) under `members/`, so it stands alone. The weights are found
on the members' validation split (never the test split) by scipy's differential evolution,
seeded: the objective is the number of correct top-1 answers, ties broken by the log-loss.
`EnsemblePredictor` has the Predictor's interface (predict, predict_images, run_samples,
explain per member), so every command that takes a model directory takes an ensemble too.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lookcloser.data.images import list_image_files
from lookcloser.data.sources import Sample
from lookcloser.errors import ConfigError, ModelDirError
from lookcloser.fileio import atomic_path, atomic_write_text
from lookcloser.modeldir import (
    ENSEMBLE_JSON,
    MODEL_JSON,
    check_format,
    check_inside,
    is_ensemble_dir,
    read_json_file,
    versions,
)
from lookcloser.predictor import (
    EvalOutput,
    Explanation,
    Prediction,
    Predictions,
    PredictionStream,
    Predictor,
    ProbabilityBatch,
    check_predict_arguments,
    collect_probabilities,
    top_predictions,
)
from lookcloser.records import RunRecord
from lookcloser.tta import TTA

FORMAT = "lookcloser.ensemble"
FORMAT_VERSION = 1
MEMBERS = "members"
MAX_MEMBERS = 100  # each member is a whole model in memory


class EnsemblePredictor:
    """Member Predictors whose probabilities are averaged with weights (summing to 1).

    The same interface as `Predictor` for what works on image files or PIL images; the tensor
    level (`preprocess`, `probabilities`) needs members with the same preprocessing.
    """

    def __init__(
        self,
        members: Sequence[Predictor],
        weights: Sequence[float],
        names: Sequence[str] | None = None,
        info: dict[str, Any] | None = None,
    ):
        if not members:
            raise ConfigError("ensemble: no members")
        if len(weights) != len(members):
            raise ConfigError(f"ensemble: {len(weights)} weights for {len(members)} members")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"ensemble: weights must be >= 0 and not all 0, got {list(weights)}")
        for member in members[1:]:
            if member.classes != members[0].classes:
                raise ConfigError("ensemble: the members' classes differ (names or order)")
        self.members = list(members)
        self.weights = (w / w.sum()).tolist()
        self.names = (
            list(names) if names is not None else [f"member-{i}" for i in range(len(members))]
        )
        self.classes = list(members[0].classes)
        self.device = members[0].device
        # The metadata any member takes (each member reads its own keys from the same dicts).
        self.meta_keys = list(dict.fromkeys(k for m in members for k in m.meta_keys))
        self.info = {**(info or {}), "config": members[0].info.get("config", {})}

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = "cpu",
        tta: TTA | str | None = None,
        trust_modules: Iterable[str] = (),
    ) -> EnsemblePredictor:
        """Load an ensemble directory; `tta` as for Predictor.load (None: ensemble.json's),
        `trust_modules` as for Predictor.load (for every member)."""
        record = read_ensemble_json(path)
        spec = record.get("tta") if tta is None else tta
        members = [
            Predictor.load(Path(path) / m["path"], device, spec or "none", trust_modules)
            for m in record["members"]
        ]
        return cls(members, record["weights"], [m["name"] for m in record["members"]], record)

    # ---- settings shared with the members -----------------------------------------------------
    @property
    def tta(self) -> TTA | None:
        """Test-time augmentation of every member (None: off)."""
        return self.members[0].tta

    @tta.setter
    def tta(self, value: TTA | str | None) -> None:
        for member in self.members:
            member.tta = value

    @property
    def max_pixels(self) -> int:
        """Decompression-bomb limit of the members' image reading."""
        return self.members[0].max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int) -> None:
        for member in self.members:
            member.max_pixels = value

    def _same_preprocessing(self, what: str) -> Predictor:
        first = self.members[0]
        for member in self.members[1:]:
            if (member.image_size, member.crop_pct, member.interpolation) != (
                first.image_size,
                first.crop_pct,
                first.interpolation,
            ):
                raise ConfigError(
                    f"ensemble {what}: the members preprocess images differently; use "
                    "predict, predict_images or run_samples, which preprocess per member"
                )
        return first

    @property
    def image_size(self) -> int:
        """The members' input size (ConfigError if they differ)."""
        return self._same_preprocessing("image_size").image_size

    # ---- combining ----------------------------------------------------------------------------
    def combine(self, probabilities: Sequence[Tensor]) -> Tensor:
        """The weighted mean of the members' N x C probabilities."""
        total = sum(w * p.float() for w, p in zip(self.weights, probabilities, strict=True))
        return total

    def combine_outputs(self, outputs: Sequence[EvalOutput]) -> EvalOutput:
        """One EvalOutput from the members' (same samples): logits = log of the mixture."""
        probs = self.combine([o.logits.float().softmax(dim=1) for o in outputs])
        first = outputs[0]
        return EvalOutput(probs.clamp_min(1e-12).log(), first.labels, list(first.paths))

    # ---- the Predictor interface --------------------------------------------------------------
    def preprocess(self, image: Image.Image | str | Path) -> Tensor:
        """One image as the members' input (they must preprocess alike)."""
        return self._same_preprocessing("preprocess").preprocess(image)

    def probabilities(
        self, images: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Mixture probabilities of preprocessed images (members must preprocess alike;
        metadata in `meta_keys` order)."""
        self._same_preprocessing("probabilities")
        return self.combine(
            [m.probabilities(images, *self._member_meta(m, meta, meta_mask)) for m in self.members]
        )

    def logits(
        self, images: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Log of the mixture probabilities (its softmax gives them back)."""
        return self.probabilities(images, meta, meta_mask).clamp_min(1e-12).log()

    def _member_meta(self, member: Predictor, meta, meta_mask):
        if meta is None or not member.meta_keys:
            return None, None
        columns = [self.meta_keys.index(k) for k in member.meta_keys]
        return meta[:, columns], None if meta_mask is None else meta_mask[:, columns]

    def meta_rows(self, metas: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """N x K values and mask of metadata dicts, in `meta_keys` order."""
        from lookcloser.data.meta import meta_tensors

        return meta_tensors(metas, self.meta_keys)

    def predict(
        self,
        paths: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
    ) -> Predictions:
        """Top-k predictions of the mixture for image files and folders (as Predictor.predict)."""
        return self.predict_stream(
            paths, top_k, batch_size, num_workers, on_bad_image, meta
        ).collect()

    def predict_stream(
        self,
        paths: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
    ) -> PredictionStream:
        """The mixture's top-k predictions batch by batch (as Predictor.predict_stream)."""
        check_predict_arguments(top_k, batch_size, on_bad_image)
        files = [str(f) for p in paths for f in list_image_files(p)]
        batches = self.file_probability_batches(files, batch_size, num_workers, on_bad_image, meta)
        return PredictionStream(files, batches, self.classes, top_k, on_bad_image)

    def file_probabilities(
        self,
        files: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
    ) -> tuple[list[int], Tensor, list[tuple[str, str]]]:
        """(positions read, N x C mixture probabilities, [(path, reason)] not read)."""
        batches = self.file_probability_batches(files, batch_size, num_workers, on_bad_image, meta)
        return collect_probabilities(files, batches, len(self.classes))

    def file_probability_batches(
        self,
        files: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
    ) -> Iterator[ProbabilityBatch]:
        """The mixture's probabilities batch by batch (as Predictor.file_probability_batches):
        the members read the files in lockstep, each with its own preprocessing."""
        streams = [
            m.file_probability_batches(files, batch_size, num_workers, on_bad_image, meta)
            for m in self.members
        ]  # made here: each member checks the metadata before the first batch
        return self._mix_batches(streams)

    def _mix_batches(
        self, streams: Sequence[Iterator[ProbabilityBatch]]
    ) -> Iterator[ProbabilityBatch]:
        for parts in zip(*streams, strict=True):  # same files, same batch size: same batches
            failures: dict[int, str] = {}
            for _, _, failed in parts:
                for i, reason in failed:
                    failures.setdefault(i, reason)
            bad = sorted(failures.items())
            if any(probs is None for _, probs, _ in parts):
                yield [], None, bad
                continue
            # The images every member read (a member's transform may fail where another's
            # does not), in the batch's order.
            keep = [i for i in parts[0][0] if i not in failures]
            member_probs = []
            for positions, probs, _ in parts:
                row = {position: r for r, position in enumerate(positions)}
                member_probs.append(probs[[row[i] for i in keep]])
            yield keep, self.combine(member_probs), bad

    def predict_images(
        self,
        images: Sequence[Image.Image],
        top_k: int = 5,
        names: Sequence[str] | None = None,
        meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Prediction]:
        """Top-k predictions of the mixture for PIL images (as Predictor.predict_images)."""
        check_predict_arguments(top_k, 1, "error")
        names = list(names) if names is not None else [f"image-{i}" for i in range(len(images))]
        if not images:
            return []
        probs = self.image_probabilities(images, meta)
        return top_predictions(names, range(len(images)), probs, self.classes, top_k)

    def image_probabilities(
        self, images: Sequence[Image.Image], meta: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        """N x C mixture probabilities of PIL images."""
        return self.combine([m.image_probabilities(images, meta) for m in self.members])

    def run_samples(
        self,
        samples: Sequence[Sample],
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        description: str = "evaluate",
    ) -> EvalOutput:
        """Mixture log-probabilities of labelled samples (each member preprocesses its own)."""
        return self.combine_outputs(
            [
                m.run_samples(samples, batch_size, num_workers, progress, f"{description} ({n})")
                for m, n in zip(self.members, self.names, strict=True)
            ]
        )

    def explain(
        self,
        image: str | Path | Image.Image,
        target: int | str | None = None,
        map_name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        part: int | None = None,
    ) -> list[tuple[str, Explanation]]:
        """Each member's explanation (name, Explanation) of one class: `target`, else the
        ensemble's prediction, so the maps are comparable."""
        if target is None:
            picture = image if isinstance(image, Image.Image) else None
            if picture is None:
                from lookcloser.data.images import load_image

                picture = load_image(image, self.max_pixels)
            probs = self.image_probabilities([picture], [meta or {}])
            target = int(probs[0].argmax())
        return [
            (name, member.explain(image, target, map_name, meta, part))
            for name, member in zip(self.names, self.members, strict=True)
        ]


# ---- the directory --------------------------------------------------------------------------------
def read_ensemble_json(path: str | Path) -> dict[str, Any]:
    """The parsed ensemble.json of an ensemble directory, checked for format, members (model
    directories inside it) and weights: like model.json, it is untrusted input."""
    path = Path(path)
    file = path / ENSEMBLE_JSON
    if not file.is_file():
        raise ModelDirError(f"{path}: no {ENSEMBLE_JSON}; not an ensemble directory")
    record = read_json_file(file, ENSEMBLE_JSON)
    check_format(file, record, FORMAT, FORMAT_VERSION)
    for key in ("members", "weights"):
        if key not in record:
            raise ModelDirError(f"{file}: missing field {key!r}")
    members = record["members"]
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise ModelDirError(f"{file}: members: expected a list of 1 to {MAX_MEMBERS} members")
    for i, member in enumerate(members):
        where = f"members[{i}]"
        if not isinstance(member, dict) or not all(
            isinstance(member.get(k), str) and member.get(k) for k in ("name", "path")
        ):
            raise ModelDirError(f"{file}: {where}: expected a mapping with a name and a path")
        # fit records members/<name>: a folder inside the ensemble, never one beside it.
        relative = Path(member["path"])
        if relative.is_absolute() or ".." in relative.parts or "\\" in member["path"]:
            raise ModelDirError(
                f"{file}: {where}.path: expected a folder inside {path}, got {member['path']!r}"
            )
        check_inside(file, f"{where}.path", path / relative)
        if not (path / relative / MODEL_JSON).is_file():
            raise ModelDirError(f"{file}: member {member['path']!r} has no {MODEL_JSON}")
    weights = record["weights"]
    if not (
        isinstance(weights, list)
        and len(weights) == len(members)
        and all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights
        )
        and sum(weights) > 0
    ):
        raise ModelDirError(
            f"{file}: weights: expected {len(members)} numbers >= 0 (one per member, not all 0), "
            f"got {str(weights)[:80]}"
        )
    if "tta" in record:
        if not isinstance(record["tta"], str | None):
            raise ModelDirError(f"{file}: tta: expected a spec such as 'flip'")
        try:
            TTA.parse(record["tta"])
        except ConfigError as err:
            raise ModelDirError(f"{file}: {err}") from None
    return record


def _copy(source: Path, target: Path) -> None:
    """Copy a file's bytes atomically (the copy gets the user's umask, not the source's mode)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def write_ensemble_dir(
    out: str | Path,
    member_dirs: Sequence[str | Path],
    fit: EnsembleFit,
    info: dict[str, Any],
    use: str = "fitted",
) -> Path:
    """Copy the members' model files under `out/members/` and write ensemble.json (last);
    `use` says which weights predict: the fitted ones or equal ones (both are recorded)."""
    if use not in ("fitted", "equal"):
        raise ConfigError(f"ensemble weights: expected 'fitted' or 'equal', got {use!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder")
    if any(is_ensemble_dir(d) for d in member_dirs):
        raise ConfigError("ensemble members must be model directories, not ensembles")
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, source in enumerate(member_dirs):
        source = Path(source)
        name = f"{i}-{source.resolve().name}"
        target = out / MEMBERS / name
        target.mkdir(parents=True)
        record = json.loads((source / MODEL_JSON).read_text())
        weights = record["weights"]["file"]
        if not isinstance(weights, str) or weights in ("", "..") or Path(weights).name != weights:
            raise ModelDirError(
                f"{source / MODEL_JSON}: weights.file {weights!r} is not a file name in the "
                "model directory"
            )
        _copy(source / weights, target / weights)
        _copy(source / MODEL_JSON, target / MODEL_JSON)  # last: the copy is complete
        members.append(
            {
                "name": name,
                "path": f"{MEMBERS}/{name}",
                "source": str(source.resolve()),
                "validation": fit.member_scores[i],
            }
        )
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": members,
        "weights": fit.weights if use == "fitted" else [1 / len(members)] * len(members),
        "uses": use,
        "fitted_weights": fit.weights,
        "equal_weights": [1 / len(members)] * len(members),
        **info,
        "validation": {
            **info.get("validation", {}),
            "images": fit.images,
            "fitted": fit.fitted_score,
            "equal": fit.equal_score,
        },
        "fit": fit.search,
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / ENSEMBLE_JSON, json.dumps(record, indent=2) + "\n")
    return out


# ---- fitting the weights ------------------------------------------------------------------------
@dataclass
class EnsembleFit:
    """Fitted weights (summing to 1) and the scores they and equal weights get."""

    weights: list[float]
    fitted_score: dict[str, float]
    equal_score: dict[str, float]
    member_scores: list[dict[str, float]]
    images: int
    search: dict[str, Any]

    @property
    def equal_weights(self) -> list[float]:
        """1 / M for each of the M members."""
        return [1 / len(self.weights)] * len(self.weights)


@dataclass
class MemberOutputs:
    """What the weight search scores mixtures on: per validation image, its candidate classes
    (ascending; padding marked invalid), each member's probability of each candidate, the
    label's column and each member's probability of the label.

    Built from dense M x N x C probabilities (every class a candidate: exact) or from the
    members' RunRecords (`from_records`): the candidates are then the union of the members'
    top-K classes and the label. A member's probability for a candidate outside its own
    top-K is taken as 0 (it is at most its K-th probability), so the mixture's top-1 is
    approximate where a class outside a member's top-K would win; the label's probability is
    stored exactly for every member, so the log-loss is exact. The label exact and the other
    classes' mixtures lower bounds, the top-1 leans optimistic: on synthetic members whose
    probability is peaked (most of it in their top 10) it was off the dense count by about
    0.1 % of the images; on flat members (little in the top 10 of 1,000 classes) by 1 to 12 %.
    With K >= C (every record keeps every class) the candidates are all classes and the
    figures are the dense ones.
    """

    probs: np.ndarray  # M x N x L float64: member m's probability of candidate j of image n
    classes: np.ndarray | None  # N x L candidate classes (None: all C classes, in order)
    valid: np.ndarray | None  # N x L, False for padding (None: all valid)
    true_column: np.ndarray  # N: the label's column
    true_probs: np.ndarray  # M x N float64: each member's probability of the label
    labels: np.ndarray  # N

    @property
    def members(self) -> int:
        return self.probs.shape[0]

    @property
    def images(self) -> int:
        return len(self.labels)

    @classmethod
    def from_dense(cls, probs: np.ndarray, labels: np.ndarray) -> MemberOutputs:
        """Every class a candidate: `probs` M x N x C, `labels` N."""
        rows = np.arange(len(labels))
        return cls(probs, None, None, labels, probs[:, rows, labels], labels)

    @classmethod
    def from_records(cls, records: Sequence[RunRecord]) -> MemberOutputs:
        """The members' records of one split (same images, same order)."""
        first = records[0]
        for i, record in enumerate(records[1:], 1):
            if record.num_classes != first.num_classes or not np.array_equal(
                record.labels, first.labels
            ):
                raise ConfigError(
                    f"ensemble fit: member {i} was scored on other images or classes than member "
                    f"0 ({record.images} vs {first.images} images, {record.num_classes} vs "
                    f"{first.num_classes} classes)"
                )
        labels = first.labels.astype(np.int64)
        n, c = len(labels), first.num_classes
        # The union of the members' top-K and the label, per row: sorted, repeats pushed to
        # the end as c (an impossible class), then cut to the widest row.
        union = np.sort(
            np.concatenate([r.top_classes for r in records] + [first.labels[:, None]], axis=1),
            axis=1,
        ).astype(np.int64)
        union[:, 1:][union[:, 1:] == union[:, :-1]] = c
        union.sort(axis=1)
        valid = union < c
        width = int(valid.sum(axis=1).max()) if n else 1
        union, valid = union[:, :width], valid[:, :width]
        true_column = (union == labels[:, None]).argmax(axis=1)
        # Each member's probability of each candidate, by (image, class) keys searched in the
        # member's own sorted keys: linear in images x candidates, no images x classes array.
        keys = np.arange(n, dtype=np.int64)[:, None] * (c + 1) + union
        probs = np.zeros((len(records), n, width), dtype=np.float64)
        rows = np.arange(n)
        for m, record in enumerate(records):
            own = np.arange(n, dtype=np.int64)[:, None] * (c + 1) + record.top_classes
            order = np.argsort(own, axis=None)
            own_keys = own.ravel()[order]
            own_probs = record.top_probs.ravel()[order].astype(np.float64)
            at = np.minimum(np.searchsorted(own_keys, keys), len(own_keys) - 1)
            found = (own_keys[at] == keys) & valid
            # A candidate outside this member's top-K counts as 0 for it: the approximation.
            probs[m] = np.where(found, own_probs[at], 0.0)
            probs[m, rows, true_column] = record.true_probs  # exact, in or out of its top-K
        true_probs = np.stack([r.true_probs.astype(np.float64) for r in records])
        return cls(probs, union, valid, true_column, true_probs, labels)


def _member_outputs(probs, labels) -> MemberOutputs:
    """MemberOutputs of dense M x N x C probabilities (checked), records or MemberOutputs."""
    if isinstance(probs, MemberOutputs):
        return probs
    if len(probs) and all(isinstance(r, RunRecord) for r in probs):
        return MemberOutputs.from_records(list(probs))
    p = np.stack([np.asarray(x, dtype=np.float64) for x in probs])
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 3 or p.shape[1] != len(y):
        raise ConfigError(
            f"ensemble fit: expected M x N x C probabilities for N labels, got {p.shape}"
        )
    return MemberOutputs.from_dense(p, y)


def score(
    weights: np.ndarray,
    probs: MemberOutputs | np.ndarray | Sequence[RunRecord],
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Top-1 and log-loss of the mixture with `weights` (M) of `probs`: dense M x N x C
    probabilities with `labels` (N), the members' RunRecords, or MemberOutputs."""
    outputs = _member_outputs(probs, labels)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
    # Member by member, the same float64 operations whatever the input, so records that
    # keep every class score exactly as the dense probabilities do.
    mix = w[0] * outputs.probs[0]
    true = w[0] * outputs.true_probs[0]
    for weight, member, member_true in zip(
        w[1:], outputs.probs[1:], outputs.true_probs[1:], strict=True
    ):
        mix += weight * member
        true += weight * member_true
    if outputs.valid is not None:
        mix[~outputs.valid] = -np.inf
    # argmax takes the first of equal values: the lowest class, candidates being ascending.
    correct = int((mix.argmax(axis=1) == outputs.true_column).sum())
    true = np.clip(true, 1e-12, None)
    n = outputs.images
    return {
        "top1": correct / n,
        "correct": correct,
        "log_loss": float(-np.log(true).mean()),
    }


def objective(
    weights: np.ndarray,
    probs: MemberOutputs | np.ndarray | Sequence[RunRecord],
    labels: np.ndarray | None = None,
) -> float:
    """To minimise: minus the correct answers, plus the log-loss squashed into [0, 1), which
    orders weights with the same top-1 and never outweighs one more correct answer."""
    s = score(weights, probs, labels)
    return -s["correct"] + s["log_loss"] / (1 + s["log_loss"])


def fit_weights(
    probs: Sequence[Tensor] | np.ndarray | Sequence[RunRecord] | MemberOutputs,
    labels: Tensor | np.ndarray | None = None,
    seed: int = 0,
    maxiter: int = 200,
    popsize: int = 15,
) -> EnsembleFit:
    """Member weights maximising validation top-1 (log-loss breaking ties), by
    scipy.optimize.differential_evolution, seeded. `probs`: each member's N x C probabilities
    with `labels`, or each member's RunRecord of the split (labels included; top-1 over the
    members' top-K classes: see MemberOutputs).

    The first population holds equal weights and each member alone, and differential
    evolution keeps its best member, so the result is never worse (by the objective) than
    equal weights or the best single member on the data it was fitted on.
    """
    from scipy.optimize import differential_evolution

    outputs = _member_outputs(probs, labels)
    if outputs.images == 0:
        raise ConfigError("ensemble fit: no validation images")
    m = outputs.members
    equal = np.full(m, 1.0 / m)
    member_scores = [score(np.eye(m)[i], outputs) for i in range(m)]
    if m == 1:
        fitted, search = equal, {"optimizer": "none (one member)"}
    else:
        rng = np.random.default_rng(seed)
        size = max(5, popsize * m)
        population = rng.uniform(0, 1, size=(size, m))
        population[0] = 1.0  # equal weights
        population[1 : 1 + m] = np.eye(m)  # each member alone
        result = differential_evolution(
            objective,
            bounds=[(0.0, 1.0)] * m,
            args=(outputs,),
            seed=seed,
            maxiter=maxiter,
            init=population,
            polish=False,  # the objective is piecewise constant: no gradient to polish with
            tol=0,
            updating="immediate",
        )
        fitted = result.x / result.x.sum() if result.x.sum() > 0 else equal
        if objective(equal, outputs) <= objective(fitted, outputs):
            fitted = equal  # no better than equal weights: keep the simpler answer
        search = {
            "optimizer": "scipy.optimize.differential_evolution",
            "objective": "correct top-1 answers; log-loss breaks ties",
            "seed": seed,
            "maxiter": maxiter,
            "population": size,
            "evaluations": int(result.nfev),
        }
    return EnsembleFit(
        weights=[float(w) for w in fitted],
        fitted_score=score(fitted, outputs),
        equal_score=score(equal, outputs),
        member_scores=member_scores,
        images=outputs.images,
        search=search,
    )
