"""``sd-triton verify``: golden-set checks against the session's tritonserver (tiny model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from sd_triton.client import InvalidRequestError, cli
from sd_triton.client import verify as V

CASES = {
    "cases": [
        # Seed 2: an image the tiny safety checker leaves alone (seed 1's is blacked out).
        {"name": "cat", "prompt": "a photo of a cat", "seed": 2, "num_inference_steps": 2},
        {
            "name": "dogs",
            "prompt": "two dogs",
            "seed": 2,
            "num_inference_steps": 2,
            "scheduler": "euler_a",
            "num_images_per_prompt": 2,
        },
    ]
}


@pytest.fixture
def cases_file(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(CASES))
    return path


def test_the_shipped_golden_set_loads():
    cases = V.load_cases()
    assert len(cases) >= 3 and all("seed" in c.options for c in cases)
    assert len({c.name for c in cases}) == len(cases)


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ({"cases": [{"name": "a", "prompt": "x"}]}, "'seed' \\(an integer\\) is required"),
        ({"cases": [{"name": "a", "prompt": "x", "seed": 1, "steps": 2}]}, "unknown keys"),
        ({"cases": [{"name": "a/b", "prompt": "x", "seed": 1}]}, "'name' must be"),
        ({"cases": []}, "non-empty list"),
        ({"prompts": []}, "expected JSON"),
    ],
)
def test_bad_golden_sets_are_refused_with_the_reason(tmp_path, cases, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cases))
    with pytest.raises(InvalidRequestError, match=message):
        V.load_cases(path)


def test_image_difference_is_max_level_and_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert V.image_difference(a, b) == (0, math.inf)
    b[0, 0, 0] = 255
    diff, psnr = V.image_difference(a, b)
    assert diff == 255 and psnr == pytest.approx(10 * math.log10(255**2 / (255**2 / 48)))


@pytest.mark.server
def test_golden_pngs_round_trip_and_an_altered_one_fails_naming_it(
    triton_url, cases_file, tmp_path, capsys
):
    golden = tmp_path / "golden"
    base = ["--url", triton_url, "--cases", str(cases_file)]
    assert cli.main(["verify", *base, "--write-golden", str(golden)]) == cli.EXIT_OK
    names = sorted(p.name for p in golden.iterdir())
    assert names == ["cat.png", "dogs-1.png", "dogs.png"]
    capsys.readouterr()

    assert cli.main(["verify", *base, "--golden", str(golden)]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["cat", "dogs", "dogs-1"]
    assert all("max_diff=0\tpsnr=inf dB\tok" in line for line in lines)

    altered = golden / "dogs-1.png"
    with Image.open(altered) as image:
        pixels = np.asarray(image.convert("RGB")).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + 2) % 256  # two levels: over the default limit
    Image.fromarray(pixels).save(altered)
    assert cli.main(["verify", *base, "--golden", str(golden)]) == cli.EXIT_VERIFY_FAILED
    captured = capsys.readouterr()
    assert "dogs-1\tmax_diff=2\t" in captured.out and "FAIL" in captured.out
    assert captured.err == "sd-triton: verify: 1 of 3 images differ: dogs-1\n"
    assert cli.main(["verify", *base, "--golden", str(golden), "--max-diff", "2"]) == cli.EXIT_OK


@pytest.mark.server
def test_a_different_render_fails(triton_url, cases_file, tmp_path, capsys):
    golden = tmp_path / "golden"
    base = ["--url", triton_url]
    assert (
        cli.main(["verify", *base, "--cases", str(cases_file), "--write-golden", str(golden)]) == 0
    )
    reseeded = json.loads(cases_file.read_text())
    reseeded["cases"][0]["seed"] = 5
    other = tmp_path / "reseeded.json"
    other.write_text(json.dumps(reseeded))
    capsys.readouterr()
    code = cli.main(["verify", *base, "--cases", str(other), "--golden", str(golden)])
    captured = capsys.readouterr()
    assert code == cli.EXIT_VERIFY_FAILED
    assert captured.err == "sd-triton: verify: 1 of 3 images differ: cat\n"


@pytest.mark.server
def test_the_same_version_against_itself_passes(triton_url, cases_file, capsys):
    base = ["verify", "--url", triton_url, "--cases", str(cases_file)]
    assert cli.main([*base, "--against", "stable_diffusion:1"]) == cli.EXIT_OK
    assert cli.main([*base, "--against-url", triton_url]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.count("\tok") == 6 and "FAIL" not in out
    code = cli.main([*base, "--against", "stable_diffusion:7"])
    assert code == cli.EXIT_UNAVAILABLE  # no such version: not a pass
