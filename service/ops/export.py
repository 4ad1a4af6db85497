"""Export the gallery of record and the labelled feedback as a training dataset.

The dataset is the image-folder layout ``tcm-train`` reads directly (``dataset: imagefolder``,
``data_dir: <out>``), one class per (tenant, subject), so that training's class-disjoint split
holds out whole subjects::

    out/
      <tenant_id>__<subject>/<item_id>.<png|jpg|...>   the stored source images, as enrolled
      export.json      what was exported: tenants, classes -> (tenant, subject, images), items
                       left out (no stored image), the served model version at export time
      feedback.jsonl   the labelled decisions (one JSON object per line): match and feedback

Folder names keep the subject readable where they can (characters outside ``[A-Za-z0-9._-]``
become ``_``) and end in a short hash of the exact subject, so two subjects never share a folder.
Items without a stored image (enrolled as embeddings) cannot be trained on and are listed in
``export.json``. Feedback carries no query image (the service does not keep them), so it is
exported for evaluation and auditing, not as extra training images.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.store import Store
from tcm.exported import class_folder_name

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "PPM": ".ppm",
    "GIF": ".png",
}


def class_folder(tenant_id: str, subject: str) -> str:
    readable = _UNSAFE.sub("_", subject).strip("._")[:60] or "subject"
    digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
    return class_folder_name(tenant_id, f"{readable}-{digest}")


def _suffix(image: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(image)) as im:
            return _SUFFIX.get(im.format or "")
    except (UnidentifiedImageError, OSError):
        return None


def retrain_command(served: str | None, data: Path) -> str:
    """The command that fine-tunes the served model on this export (``tcm-train retrain``:
    its own config, weights and input format, TCM on), then stages the result."""
    source = shlex.quote(served) if served else "<the served artefact folder>"
    folder = shlex.quote(str(data))
    name = Path(str(data).rstrip("/")).name or "export"
    return (
        f"tcm-train retrain --from {source} --data {folder} --out runs/retrain-{name} "
        f"--export artefacts/retrained/{name} && "
        f"tcm-serve models stage artefacts/retrained/{name}"
    )


def export_dataset(
    store: Store,
    out: Path,
    *,
    tenants: Iterable[str] | None = None,
    min_images_per_subject: int = 1,
    page: int = 500,
) -> dict[str, Any]:
    """Writes the dataset (see the module doc) and returns the summary also written to
    ``export.json``. ``tenants``: only these (e.g. those that consented); default all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    known = {t.tenant_id for t in store.list_tenants()}
    wanted = sorted(known) if tenants is None else list(dict.fromkeys(tenants))
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ValueError(f"no such tenants: {unknown}")
    classes: dict[str, dict[str, Any]] = {}
    left_out: dict[str, list[str]] = {}
    unreadable: dict[str, list[str]] = {}
    feedback = 0
    with (out / "feedback.jsonl").open("w") as fb:
        for tid in wanted:
            after = 0
            while True:
                items = store.list_items(tid, after_seq=after, limit=page)
                if not items:
                    break
                after = items[-1].seq
                for it in items:
                    if not it.has_image:
                        left_out.setdefault(tid, []).append(it.item_id)
                        continue
                    full = store.get_item(tid, it.item_id, model_version="", with_image=True)
                    if full is None or full.image is None:  # deleted meanwhile
                        continue
                    suffix = _suffix(full.image)
                    if suffix is None:
                        unreadable.setdefault(tid, []).append(it.item_id)
                        continue
                    folder = class_folder(tid, it.subject)
                    entry = classes.setdefault(
                        folder, {"tenant_id": tid, "subject": it.subject, "images": 0}
                    )
                    (out / folder).mkdir(exist_ok=True)
                    name = hashlib.sha256(it.item_id.encode()).hexdigest()[:16] + suffix
                    (out / folder / name).write_bytes(full.image)
                    entry["images"] += 1
            for d in store.list_decisions(tid, labelled_only=True):
                fb.write(
                    json.dumps(
                        {
                            "match": asdict(d.match),
                            "feedback": asdict(d.feedback) if d.feedback else None,
                        },
                        separators=(",", ":"),
                    )
                    + "\n"
                )
                feedback += 1
    for folder, entry in list(classes.items()):
        if entry["images"] < min_images_per_subject:
            for f in (out / folder).iterdir():
                f.unlink()
            (out / folder).rmdir()
            del classes[folder]
    registry, _ = store.get_model_registry()
    active = (registry or {}).get("active")
    served = ((registry or {}).get("versions") or {}).get(active or "", {}).get("path")
    summary = {
        "exported_at": time.time(),
        "tenants": wanted,
        "model_version": active,
        "classes": classes,
        "num_classes": len(classes),
        "num_images": sum(c["images"] for c in classes.values()),
        "items_without_image": left_out,
        "unreadable_images": unreadable,
        "feedback_records": feedback,
        "min_images_per_subject": min_images_per_subject,
        "retrain_with": retrain_command(served, out),
    }
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
