"""Read a Label Studio labeling config: which Image carries boxes and which mask controls to fill.

Parsing is done by label-studio-sdk's :class:`label_studio_sdk.label_interface.LabelInterface`; this
module only picks the parts the backend needs:

* the ``<Image>`` object tags (name, and the task data key of ``value="$image"``),
* the ``<RectangleLabels>`` controls on them (the box sources),
* the ``<PolygonLabels>`` and ``<BrushLabels>`` controls on the same image (the mask targets).

A config without a box source or without a mask target on the same image is refused with a
:class:`LabelConfigError` that says what is missing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

BOX_TAGS = ("rectanglelabels",)
POLYGON_TAGS = ("polygonlabels",)
BRUSH_TAGS = ("brushlabels",)


class LabelConfigError(ValueError):
    """A labeling config that cannot be parsed or lacks a box source / mask target."""


@dataclass(frozen=True)
class Control:
    """One control tag of the config.

    Attributes:
        name: the control's ``name`` (the ``from_name`` of its regions).
        tag: lower-case tag, e.g. ``"rectanglelabels"``, ``"polygonlabels"``, ``"brushlabels"``.
        to_name: the object (image) it annotates.
        labels: the label values it offers, in config order.
    """

    name: str
    tag: str
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ImageBinding:
    """An ``<Image>`` with its box sources and mask targets.

    Attributes:
        image_name: the Image tag's ``name`` (``to_name`` of the regions).
        value_key: the task data key holding the image URL (``"image"`` for ``value="$image"``).
        box_controls: RectangleLabels controls on this image.
        polygon: the PolygonLabels control to fill, or None.
        brush: the BrushLabels control to fill, or None.
    """

    image_name: str
    value_key: str
    box_controls: tuple[Control, ...]
    polygon: Control | None
    brush: Control | None

    @property
    def targets(self) -> tuple[Control, ...]:
        """The mask controls to fill (polygon first)."""
        return tuple(c for c in (self.polygon, self.brush) if c is not None)


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a labeling config.

    Attributes:
        bindings: images that have at least one box source and one mask target, in config order.
    """

    bindings: tuple[ImageBinding, ...]

    def binding_for_box_control(self, from_name: str) -> ImageBinding | None:
        """The image binding whose box controls include ``from_name`` (None when unknown)."""
        for b in self.bindings:
            if any(c.name == from_name for c in b.box_controls):
                return b
        return None


def target_label(box_label: str, target: Control) -> str | None:
    """Map a box label to the mask control's label of the same name.

    Returns:
        the label, or None when ``target`` has no label called ``box_label`` (the region is then
        skipped as "unknown label").
    """
    return box_label if box_label in target.labels else None


def _to_names(control) -> list[str]:
    to = getattr(control, "to_name", None) or []
    if isinstance(to, str):
        to = [t for t in to.split(",") if t]
    return list(to)


def _labels(control) -> tuple[str, ...]:
    labels = getattr(control, "labels", None) or []
    return tuple(str(x) for x in labels)


@functools.lru_cache(maxsize=64)
def parse_label_config(config_xml: str) -> LabelConfig:
    """Parse a labeling config and find its box sources and mask targets.

    Args:
        config_xml: the project's labeling config (XML string).

    Returns:
        :class:`LabelConfig` with at least one binding.

    Raises:
        LabelConfigError: the XML is empty or does not parse, or no Image has both a RectangleLabels
            control (box source) and a PolygonLabels/BrushLabels control (mask target); the message
            names what is missing.
    """
    if not isinstance(config_xml, str) or not config_xml.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        li = LabelInterface(config_xml)
    except Exception as e:  # the SDK raises several exception types for bad XML
        raise LabelConfigError(f"the labeling config does not parse: {e}") from e

    images = [o for o in li.objects if str(getattr(o, "tag", "")).lower() == "image"]
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag")
    controls = []
    for c in li.controls:
        tag = str(getattr(c, "tag", "")).lower()
        for to in _to_names(c):
            controls.append(Control(name=c.name, tag=tag, to_name=to, labels=_labels(c)))

    bindings = []
    missing = []
    for img in images:
        on_img = [c for c in controls if c.to_name == img.name]
        boxes = tuple(c for c in on_img if c.tag in BOX_TAGS)
        polys = [c for c in on_img if c.tag in POLYGON_TAGS]
        brushes = [c for c in on_img if c.tag in BRUSH_TAGS]
        if not boxes:
            missing.append(f"<Image name=\"{img.name}\"> has no <RectangleLabels> (box source)")
        if not polys and not brushes:
            missing.append(f"<Image name=\"{img.name}\"> has no <PolygonLabels> or <BrushLabels> (mask target)")
        if boxes and (polys or brushes):
            value = str(getattr(img, "value", "") or "")
            value_key = getattr(img, "value_name", None) or value.lstrip("$")
            if not value_key:
                missing.append(f"<Image name=\"{img.name}\"> has no value=\"$field\"")
                continue
            bindings.append(ImageBinding(
                image_name=img.name, value_key=value_key, box_controls=boxes,
                polygon=polys[0] if polys else None, brush=brushes[0] if brushes else None))
    if not bindings:
        raise LabelConfigError("the labeling config cannot be served: " + "; ".join(missing))
    return LabelConfig(bindings=tuple(bindings))
