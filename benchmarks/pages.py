"""The pages the benchmarks read: real corpus pages first, then the demo, then generated prose."""

from __future__ import annotations

import os
import random
from pathlib import Path

from pypdf import PdfReader, PdfWriter

from vramflow.demo.make_demo import PAGES as DEMO_PAGES
from vramflow.demo.pdfgen import write_text_pdf

REPO = Path(__file__).resolve().parents[1]
DEMO_PDF = REPO / "vramflow" / "demo" / "demo.pdf"
CORPUS_FILE = "pdfjs_tracemonkey.pdf"


def corpus_dir() -> Path | None:
    """The sample corpus beside the repository (as the PDF tests find it), or $VRAMFLOW_CORPUS."""
    beside_repo = REPO.parent / "shared" / "corpus"
    if beside_repo.is_dir():
        return beside_repo
    configured = os.environ.get("VRAMFLOW_CORPUS")
    return Path(configured) if configured and Path(configured).is_dir() else None


def prose_pages(count: int, seed: int = 0) -> list[str]:
    """`count` pages of varied prose: the demo's paragraphs, reshuffled sentence by sentence."""
    rng = random.Random(seed)
    titles = [page.split("\n", 1)[0] for page in DEMO_PAGES]
    sentences = [
        sentence.strip() + "."
        for page in DEMO_PAGES
        for paragraph in page.split("\n")[1:]
        for sentence in paragraph.split(". ")
        if len(sentence) > 20
    ]
    pages = []
    for number in range(1, count + 1):
        paragraphs = [
            " ".join(s.rstrip(".") + "." for s in rng.sample(sentences, rng.randint(3, 6)))
            for _ in range(rng.randint(3, 5))
        ]
        pages.append("\n".join([f"{rng.choice(titles)}, part {number}", *paragraphs]))
    return pages


def build_page_set(folder: Path, count: int) -> tuple[Path, str]:
    """One PDF of `count` pages in `folder` and a description of where its pages come from.

    The first pages of the TraceMonkey paper (14 dense pages of real text) when the corpus is
    there, then the six demo pages, then generated prose for whatever is still missing.
    """
    if count < 1:
        raise ValueError("need at least one page")
    sources: list[tuple[Path, int]] = []
    corpus = corpus_dir()
    if corpus is not None and (corpus / CORPUS_FILE).is_file():
        sources.append((corpus / CORPUS_FILE, len(PdfReader(corpus / CORPUS_FILE).pages)))
    sources.append((DEMO_PDF, len(DEMO_PAGES)))
    writer, parts, left = PdfWriter(), [], count
    for path, pages in sources:
        take = min(pages, left)
        if take:
            writer.append(str(path), pages=(0, take))
            parts.append(f"{take} of {path.name}")
            left -= take
    if left:
        extra = write_text_pdf(folder / "prose.pdf", prose_pages(left), title="benchmark prose")
        writer.append(str(extra))
        parts.append(f"{left} generated prose pages")
    target = folder / f"pages-{count}.pdf"
    with open(target, "wb") as handle:
        writer.write(handle)
    return target, " + ".join(parts)


def write_prose_pdf(path: Path, count: int, seed: int = 0) -> Path:
    """A generated document of `count` prose pages (the scale benchmark's input)."""
    return write_text_pdf(path, prose_pages(count, seed), title=f"{count} pages of prose")


def warmup_pdf(folder: Path) -> Path:
    """A one-page document for warming up the pipeline before anything is timed."""
    return write_text_pdf(folder / "warmup.pdf", [DEMO_PAGES[0]], title="warm-up")
