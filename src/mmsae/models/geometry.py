"""Where a processed image (after pad, resize and crop) lies in the original image.

Image processors change the picture before the vision tower sees it: pad it to a square,
resize it, crop its centre. Each step is affine per axis, so the processed canvas corresponds to
a box (x0, y0, x1, y1) in original pixels; the box may reach outside the image (padding) or
cover only part of it (a centre crop).
"""

from __future__ import annotations

Box = tuple[float, float, float, float]


def size_value(size, key):
    """``size[key]`` for a dict or a transformers SizeDict (None when absent)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def resize_output_size(width: int, height: int, size) -> tuple[int, int]:
    """(width, height) after an image processor's resize to ``size`` (a dict or SizeDict)."""
    if size_value(size, "height") and size_value(size, "width"):
        return int(size_value(size, "width")), int(size_value(size, "height"))
    shortest = size_value(size, "shortest_edge")
    longest = size_value(size, "longest_edge")
    if shortest:
        # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(shortest), int(shortest * long / short)
        if longest and new_long > longest:
            new_short, new_long = int(longest * new_short / new_long), int(longest)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if longest:
        scale = longest / max(width, height)
        return int(round(width * scale)), int(round(height * scale))
    raise ValueError(f"unsupported resize size {size!r}")


def processed_canvas_box(width: int, height: int, image_processor) -> Box:
    """The box of the original image that the processor's output canvas shows.

    Follows the CLIP/LLaVA/SigLIP recipe: optional pad-to-square (centred), resize, optional
    centre crop.
    """
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    cw, ch = width, height  # current canvas size in its own pixels
    if getattr(image_processor, "do_pad", False) and type(image_processor).__name__.startswith("LlavaImageProcessor"):
        side = max(width, height)
        # pad_to_square puts the image at offset (side - w) // 2
        x0 -= (side - width) // 2
        y0 -= (side - height) // 2
        x1, y1 = x0 + side, y0 + side
        cw = ch = side
    if getattr(image_processor, "do_resize", True):
        cw, ch = resize_output_size(cw, ch, image_processor.size)
    if getattr(image_processor, "do_center_crop", False) and image_processor.crop_size is not None:
        crop_w, crop_h = int(size_value(image_processor.crop_size, "width")), int(size_value(image_processor.crop_size, "height"))
        sx, sy = (x1 - x0) / cw, (y1 - y0) / ch
        top, left = int((ch - crop_h) / 2.0), int((cw - crop_w) / 2.0)
        x0, y0 = x0 + left * sx, y0 + top * sy
        x1, y1 = x0 + crop_w * sx, y0 + crop_h * sy
    return (x0, y0, x1, y1)
