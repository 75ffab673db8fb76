"""Writing a conversation out: PNG files, a JSON record and a self-contained HTML page (images inline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from mogao.inference.session import Segment


def png_data_uri(img) -> str:
    """The image as a `data:` URI (PNG, base64), for self-contained HTML pages."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def save_conversation(history: list[Segment], out: Path, *, prefix: str = "", title: str = "mogao",
                      settings: dict | None = None, image_paths: dict[int, Path] | None = None) -> dict[str, Path]:
    """Write `history` under `out`: every image as a PNG (model images not yet in `image_paths` are saved now),
    `<prefix>conversation.json` and `<prefix>conversation.html`. Returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(image_paths or {})
    record, blocks = [], []
    for i, seg in enumerate(history):
        item: dict = {"role": seg.role}
        who = html.escape(seg.role)
        if seg.image is not None:
            if i not in paths:
                paths[i] = out / f"{prefix}{seg.role}_image_{i:03d}.png"
                seg.image.save(paths[i])
            item["image"] = paths[i].name if paths[i].parent == out else str(paths[i])
            item["size"] = list(seg.image.size)
            blocks.append(f'<div class="{who}"><b>{who}</b><br><img src="{png_data_uri(seg.image)}" '
                          f'width="{max(128, seg.image.width)}" style="image-rendering: pixelated"></div>')
        else:
            item["text"] = seg.text
            blocks.append(f'<div class="{who}"><b>{who}</b><p>{html.escape(seg.text or "")}</p></div>')
        record.append(item)
    json_path = out / f"{prefix}conversation.json"
    json_path.write_text(json.dumps({"settings": settings or {}, "conversation": record}, indent=2,
                                    ensure_ascii=False))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:48em;margin:2em auto}div{margin:1em 0;padding:.5em;"
            "border-radius:6px}.user{background:#eef}.model{background:#efe}</style></head><body><h1>"
            + html.escape(title) + "</h1>" + "\n".join(blocks) + "</body></html>")
    html_path = out / f"{prefix}conversation.html"
    html_path.write_text(page, encoding="utf-8")
    return {"json": json_path, "html": html_path, **{f"image_{i}": p for i, p in paths.items()}}
