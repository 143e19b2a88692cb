"""The README's example images: each held-out digit is labelled as its file name says."""

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_readme_examples_are_predicted_as_named(client):
    files = sorted(EXAMPLES.glob("digit-*.png"))
    assert len(files) == 10
    r = client.post(
        "/v1/models/digits/predict",
        files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files],
    )
    assert r.status_code == 200, r.text
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == [f.stem.removeprefix("digit-") for f in files]
