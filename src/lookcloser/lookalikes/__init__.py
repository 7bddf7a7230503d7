"""Look-alikes (issue 26): embeddings, a reference gallery, enrollment and an open-set answer.

- `embed`: the L2-normalised feature the class decision reads, for every image, streamed to
  Parquet or `.npy` + CSV (`Predictor.embed`, `lookcloser embed`).
- `gallery`: the embeddings of labelled reference images (safetensors + JSON, paths relative to
  a data root, never the images), bound to one model; the nearest references of the predicted
  class and of the runner-up beside every answer.
- `enroll`: new classes from a few images each, by their mean embedding, into a new model
  directory.
- `openset`: an "unknown" decision from a score calibrated on the validation split.
"""
