"""The 36 MMEB datasets as facts: meta-task, IND/OOD split, modalities, candidates per query, instruction.

Source: ../shared/design/MMEB.md (the MMEB paper's Table 1 and its appendix). The instruction is the
query-side instruction of the `original` split; the MMEB-eval files already carry it inside `qry_text`,
so evaluation never inserts it: it is here for reference and for writing data in the same style.
"""

from __future__ import annotations

from dataclasses import dataclass

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")
MODALITIES = ("image", "text", "image+text")


@dataclass(frozen=True)
class DatasetInfo:
    """One evaluation dataset.

    meta_task: "Classification" | "VQA" | "Retrieval" | "Grounding".
    split: "IND" (its training split is part of MMEB-train) | "OOD" (evaluation only).
    query / candidates: the modality of each side, "image" | "text" | "image+text" (an image-side
    candidate carries the text "Represent the given image." with its image).
    num_candidates: candidates per query as the paper lists them (the number of classes for
    classification, 1000 otherwise); the reader takes whatever each row of a file holds.
    """

    name: str
    meta_task: str
    split: str
    query: str
    candidates: str
    num_candidates: int
    instruction: str

    def __post_init__(self) -> None:
        assert self.meta_task in META_TASKS, self.meta_task
        assert self.split in SPLITS, self.split
        assert self.query in MODALITIES and self.candidates in MODALITIES


_CLS = "Represent the given image for classification."
_OBJECT = "Identify the object shown in the image."
_SCENE = "Identify the scene shown in the image."
_VQA = "Represent the given image with the following question: "

_ROWS = [
    # name, meta-task, split, query, candidates, candidates per query, instruction
    ("ImageNet-1K", "Classification", "IND", "image", "text", 1000, _CLS),
    (
        "N24News",
        "Classification",
        "IND",
        "image+text",
        "text",
        24,
        "Represent the given news image with the following caption for domain classification: ",
    ),
    (
        "HatefulMemes",
        "Classification",
        "IND",
        "image",
        "text",
        2,
        "Represent the given image for binary classification to determine whether it constitutes "
        "hateful speech or not.",
    ),
    ("VOC2007", "Classification", "IND", "image", "text", 20, _OBJECT),
    ("SUN397", "Classification", "IND", "image", "text", 397, _SCENE),
    ("Place365", "Classification", "OOD", "image", "text", 365, _SCENE),
    ("ImageNet-A", "Classification", "OOD", "image", "text", 1000, _CLS),
    ("ImageNet-R", "Classification", "OOD", "image", "text", 200, _CLS),
    ("ObjectNet", "Classification", "OOD", "image", "text", 313, _OBJECT),
    (
        "Country211",
        "Classification",
        "OOD",
        "image",
        "text",
        211,
        "Identify the country depicted in the image.",
    ),
    ("OK-VQA", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("A-OKVQA", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("DocVQA", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("InfographicsVQA", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("ChartQA", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("Visual7W", "VQA", "IND", "image+text", "text", 1000, _VQA),
    ("ScienceQA", "VQA", "OOD", "image+text", "text", 1000, _VQA),
    ("VizWiz", "VQA", "OOD", "image+text", "text", 1000, _VQA),
    ("GQA", "VQA", "OOD", "image+text", "text", 1000, _VQA),
    ("TextVQA", "VQA", "OOD", "image+text", "text", 1000, _VQA),
    (
        "VisDial",
        "Retrieval",
        "IND",
        "text",
        "image",
        1000,
        "Represent the given dialogue about an image, which is used for image retrieval: ",
    ),
    (
        "CIRR",
        "Retrieval",
        "IND",
        "image+text",
        "image",
        1000,
        "Given an image, find a similar everyday image with the described changes: ",
    ),
    ("VisualNews_t2i", "Retrieval", "IND", "text", "image", 1000, "Retrieve an image of this news caption."),
    (
        "VisualNews_i2t",
        "Retrieval",
        "IND",
        "image",
        "text",
        1000,
        "Find a caption for the news in the given photo.",
    ),
    (
        "MSCOCO_t2i",
        "Retrieval",
        "IND",
        "text",
        "image",
        1000,
        "Find me an everyday image that matches the given caption: ",
    ),
    (
        "MSCOCO_i2t",
        "Retrieval",
        "IND",
        "image",
        "text",
        1000,
        "Find an image caption describing the given everyday image.",
    ),
    (
        "NIGHTS",
        "Retrieval",
        "IND",
        "image",
        "image",
        1000,
        "Find a day-to-day image that looks similar to the provided image.",
    ),
    (
        "WebQA",
        "Retrieval",
        "IND",
        "text",
        "image+text",
        1000,
        "Find a Wikipedia image that answers this question: ",
    ),
    (
        "OVEN",
        "Retrieval",
        "OOD",
        "image+text",
        "image+text",
        1000,
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image: ",
    ),
    (
        "FashionIQ",
        "Retrieval",
        "OOD",
        "image+text",
        "image",
        1000,
        "Find an image to match the fashion image and style note: ",
    ),
    (
        "EDIS",
        "Retrieval",
        "OOD",
        "text",
        "image+text",
        1000,
        "Find a news image that matches the provided caption: ",
    ),
    (
        "Wiki-SS-NQ",
        "Retrieval",
        "OOD",
        "text",
        "image",
        1000,
        "Find the document image that can answer the given query: ",
    ),
    (
        "MSCOCO",
        "Grounding",
        "IND",
        "image+text",
        "image",
        1000,
        "Select the portion of the image that isolates the object labeled as ",
    ),
    (
        "Visual7W-Pointing",
        "Grounding",
        "OOD",
        "image+text",
        "image",
        1000,
        "Select the portion of the image that answers the question ",
    ),
    (
        "RefCOCO",
        "Grounding",
        "OOD",
        "image+text",
        "image",
        1000,
        "Select the portion of the image that follows the language expressions. ",
    ),
    (
        "RefCOCO-Matching",
        "Grounding",
        "OOD",
        "image+text",
        "image+text",
        1000,
        "Select the portion of the image that follows the language expressions: ",
    ),
]

DATASETS: dict[str, DatasetInfo] = {row[0]: DatasetInfo(*row) for row in _ROWS}
"""All 36 MMEB datasets, name -> DatasetInfo, in the order the paper's tables use."""

# Image-side candidates in MMEB-eval carry this text (the placeholder goes before it).
IMAGE_TARGET_INSTRUCTION = "Represent the given image."


# The bundled benchmark (eval/bundled.py writes it from images that installed packages ship): its datasets
# are declared here beside MMEB's, so `aggregate` and the reader know them.
PHOTO_CANDIDATES = 10
BUNDLED_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "Digits", "Classification", "IND", "image", "text", 10, "Represent the given image for classification."
        ),
        DatasetInfo(
            "Photos_t2i", "Retrieval", "IND", "text", "image", PHOTO_CANDIDATES,
            "Find me an everyday image that matches the given caption: ",
        ),
        DatasetInfo(
            "Photos_i2t", "Retrieval", "IND", "image", "text", PHOTO_CANDIDATES,
            "Find an image caption describing the given everyday image.",
        ),
        DatasetInfo(
            "PhotoPairs", "Retrieval", "OOD", "image", "image", PHOTO_CANDIDATES,
            "Find a day-to-day image that looks similar to the provided image.",
        ),
    )
}  # fmt: skip
"""The bundled benchmark's datasets, name -> DatasetInfo (known to `aggregate` beside the 36 of MMEB)."""


def known_datasets() -> dict[str, DatasetInfo]:
    """The 36 MMEB datasets plus the bundled benchmark's, name -> DatasetInfo."""
    return {**DATASETS, **BUNDLED_DATASETS}
