"""Draw the example pictures in examples/pictures/ (synthetic scenes of the kind the demo model knows, drawn with a
seed the demo model was never trained on).

    python scripts/make_example_pictures.py
"""

from __future__ import annotations

import random
from pathlib import Path

from belle_vl_tools.demo_data import Scene, Shape, random_scene, render

OUT = Path(__file__).resolve().parent.parent / "examples" / "pictures"
SEED = 20261125


def single(color: str, kind: str, cell: tuple[int, int], size: int = 112) -> Scene:
    """One shape filling most of a grid cell."""
    step = size / 3
    side = round(step * 0.8)
    x0 = round(cell[1] * step + (step - side) / 2)
    y0 = round(cell[0] * step + (step - side) / 2)
    return Scene(size, (Shape(kind, color, cell, (x0, y0, x0 + side, y0 + side)),))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    render(single("red", "circle", (1, 1))).save(OUT / "red_circle.png")
    render(single("blue", "square", (0, 2))).save(OUT / "blue_square.png")
    rng = random.Random(SEED)
    scene = random_scene(rng, word=True, n=3)
    render(scene).save(OUT / "shapes_and_word.png")
    for name in sorted(p.name for p in OUT.glob("*.png")):
        print(OUT / name)


if __name__ == "__main__":
    main()
