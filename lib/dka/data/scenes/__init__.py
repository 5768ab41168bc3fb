"""Concept scenes: the built-in dataset whose class -> concept composition is known exactly.

Every image is drawn from named concepts in Broden's categories — colour blobs (`color`), grey
textures (`texture`), shaded shapes (`object`), marks on those shapes (`part`) and a background
(`scene`, an image-level label) — and every class is a fixed set of 2-4 concepts that it shares with
other classes. An image holds its class's concepts plus distractors that never complete another class
(and are often a near miss, one concept short of one), at random places and scales, with noise, so the
class can only be read from the combination of concepts. The export is in Broden's on-disk format, so
Network Dissection runs on it through the same loader as on real Broden, and `class_concepts.csv`
holds the ground truth that explanations are scored against.

- `vocabulary`  concept names, the presets (`SCENE_PRESETS`), each class's concept set
- `elements`    typed scene elements (ColourBlob, TextureBlob, Shape, Part, Background): mask and paint
- `maker`       SceneMaker: one image's concepts, layout and pixels, from its own random stream
- `export`      `generate`: the Broden-format export, reused only when intact
- `manifest`    sizes and sha256 of the files an export wrote, and the check against them
- `scratch`     the generator's scratch folders, removed after a kill
"""

from dka.data.scenes.elements import Background, ColourBlob, Element, Part, Shape, TextureBlob
from dka.data.scenes.export import GENERATOR_VERSION, INDEX_COLUMNS, JPEG_QUALITY, PARAMS_FILE, decode_label_png, \
    encode_label_png, generate, is_export, params_for, read_classes, read_params, require_intact
from dka.data.scenes.maker import SPLITS, Scene, SceneMaker
from dka.data.scenes.manifest import MANIFEST_FILE, DamagedExportError, ExportCheck, check_export, \
    regenerate_advice
from dka.data.scenes.vocabulary import PIXEL_CATEGORIES, SCENE_PRESETS, Concept, Preset, preset_by_name, \
    sample_classes, vocabulary

__all__ = ["generate", "SceneMaker", "Scene", "Preset", "SCENE_PRESETS", "Concept", "preset_by_name", "vocabulary",
           "sample_classes", "Element", "ColourBlob", "TextureBlob", "Shape", "Part", "Background",
           "encode_label_png", "decode_label_png", "params_for", "is_export", "read_params", "read_classes", "require_intact", "check_export",
           "ExportCheck", "DamagedExportError", "regenerate_advice", "GENERATOR_VERSION", "PARAMS_FILE",
           "MANIFEST_FILE", "INDEX_COLUMNS", "PIXEL_CATEGORIES", "SPLITS", "JPEG_QUALITY"]
