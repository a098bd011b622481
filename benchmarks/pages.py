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


# The mixed set's real pages by length class (file, 1-based pages): a one-line form and an
# annotation; tax-form pages and typeset pages of a few thousand bytes; dense two-column paper
# pages past 1,536 tokens (about 4 bytes a token), which the prompt cuts there.
MIXED_CORPUS = {
    "short": [("sf_pdflatex-forms.pdf", 1), ("sf_annotated_pdf.pdf", 1)],
    "medium": [*(("pdfminer_f1040nr.pdf", n) for n in range(1, 6))]
    + [("sf_pdflatex-4-pages.pdf", n) for n in range(1, 5)],
    "long": [("pdfjs_tracemonkey.pdf", n) for n in range(1, 15)],
}
# Generated pages by class, in bytes of text: a line and a paragraph; a half page; a page of 60
# full lines (~1,350 tokens, as much as the PDF writer puts on a page).
GENERATED_BYTES = {"short": (60, 500), "medium": (2400,), "long": (5400,)}
# Classes repeat in this order, so a document's consecutive pages differ in length and any
# batch of consecutive pages mixes a line with a page near the token limit.
MIXED_ORDER = ("long", "short", "medium", "short", "long", "medium", "short", "medium")


def _sentences() -> list[str]:
    return [
        sentence.strip().rstrip(".") + "."
        for page in DEMO_PAGES
        for paragraph in page.split("\n")[1:]
        for sentence in paragraph.split(". ")
        if len(sentence) > 20
    ]


def generated_text(size: int, rng: random.Random) -> str:
    """About `size` bytes of prose in one paragraph, sentences drawn at random."""
    sentences, text = _sentences(), ""
    while len(text) < size:
        text += rng.choice(sentences) + " "
    return text[:size].rsplit(" ", 1)[0]


def _mixed_sources(count: int, corpus: Path | None) -> list[tuple[str, Path | str, int]]:
    """(class, source, page) for each page in order: a corpus file and its page, or generated
    text (page 0); each class alternates its real pages with generated ones while they last."""
    rng, pools = random.Random(0), {}
    for kind, sizes in GENERATED_BYTES.items():
        real = [
            (corpus / name, n)
            for name, n in MIXED_CORPUS[kind]
            if corpus is not None and (corpus / name).is_file()
        ]
        made = [(generated_text(sizes[i % len(sizes)], rng), 0) for i in range(count)]
        pools[kind] = [p for i in range(count) for p in [*real[i : i + 1], made[i]]]
    taken = {kind: 0 for kind in pools}
    order = []
    for index in range(count):
        kind = MIXED_ORDER[index % len(MIXED_ORDER)]
        source, page = pools[kind][taken[kind]]
        taken[kind] += 1
        order.append((kind, source, page))
    return order


def build_mixed_page_set(folder: Path, count: int) -> tuple[Path, str]:
    """One PDF of `count` pages of very different lengths, and where they come from.

    Real corpus pages (form, typeset and dense paper pages) when the corpus is there, alternated
    with generated ones (a line, a paragraph, half a page, a full page near 1,536 tokens), so the
    set works without the corpus too; lengths follow MIXED_ORDER, as in documents that mix
    cover sheets, forms and dense text (every static batch then pads short pages to long ones).
    """
    if count < 1:
        raise ValueError("need at least one page")
    order = _mixed_sources(count, corpus_dir())
    texts = [source for _, source, page in order if page == 0]
    generated = write_text_pdf(folder / "mixed-generated.pdf", texts, title="mixed lengths")
    writer, made, real = PdfWriter(), 0, {}
    for _, source, page in order:
        if page == 0:
            writer.append(str(generated), pages=(made, made + 1))
            made += 1
        else:
            writer.append(str(source), pages=(page - 1, page))
            real[source.name] = real.get(source.name, 0) + 1
    target = folder / f"mixed-{count}.pdf"
    with open(target, "wb") as handle:
        writer.write(handle)
    parts = [f"{n} of {name}" for name, n in real.items()] + [f"{made} generated"]
    return target, "mixed lengths: " + " + ".join(parts)
