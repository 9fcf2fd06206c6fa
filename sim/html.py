"""A self-contained HTML report: the summary tables and every plot (embedded as data URIs) in one file."""
from __future__ import annotations

import base64
import html
from pathlib import Path

PLOTS = (("latency_cdf.png", "Latency CDFs"), ("throughput_queue.png", "Throughput and queue over time"),
         ("kv_usage.png", "KV-cache usage per replica"))


def _md_table_to_html(lines: list[str]) -> str:
    rows = [ln.strip().strip("|").split("|") for ln in lines if not set(ln.strip()) <= set("|-: ")]
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    tr = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{tr}</tbody></table>"


def write_html(summary_md: str, out_dir: Path) -> Path:
    parts, table = [], []
    for line in summary_md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(_md_table_to_html(table))
            table = []
        if line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            parts.append(f"<p>&bull; {html.escape(line[2:]).replace('`', '')}</p>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    for name, title in PLOTS:
        p = out_dir / name
        if p.is_file():
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>servesim report</title><style>{style}</style>" \
          f"</head><body>{''.join(parts)}</body></html>\n"
    path = out_dir / "report.html"
    path.write_text(doc)
    return path
