"""``detailfusion score-cirr --split FILE`` on the real CIRR val annotations and split: a submission of split images is
scored; one name outside the split's image list is refused, the message naming the image, the pairid and the file."""

import json

import pytest

from detailfusion.platform.cli import main


def submissions(annotations: list[dict], images: list[str]) -> tuple[dict, dict]:
    """Both files with every target first: recall (50 split images), recall_subset (3 of the set's members)."""
    recall, subset = {"version": "rc2", "metric": "recall"}, {"version": "rc2", "metric": "recall_subset"}
    for record in annotations:
        pairid, target, reference = str(record["pairid"]), record["target_hard"], record["reference"]
        recall[pairid] = [target] + [n for n in images[:52] if n not in (target, reference)][:49]
        subset[pairid] = [target] + [m for m in record["img_set"]["members"] if m not in (target, reference)][:2]
    return recall, subset


@pytest.fixture
def val(shared_datasets, tmp_path):
    cirr = shared_datasets / "cirr"
    annotations = cirr / "captions/cap.rc2.val.json"
    split = cirr / "image_splits/split.rc2.val.json"
    recall, subset = submissions(json.loads(annotations.read_text()), sorted(json.loads(split.read_text())))
    return {"annotations": annotations, "split": split, "recall": recall, "subset": subset, "dir": tmp_path}


def score(val, recall: dict, *extra: str) -> int:
    paths = {}
    for name, data in (("recall", recall), ("subset", val["subset"])):
        paths[name] = val["dir"] / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return main(["score-cirr", "--annotations", str(val["annotations"]), "--recall", str(paths["recall"]),
                 "--recall-subset", str(paths["subset"]), *extra])


def test_a_submission_of_split_images_is_scored(val, capsys):
    assert score(val, val["recall"], "--split", str(val["split"])) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["R@1"] == 100.0 and metrics["Rs@1"] == 100.0


def test_an_image_outside_the_split_is_refused_naming_image_pairid_and_file(val, capsys):
    pairid = str(json.loads(val["annotations"].read_text())[7]["pairid"])
    recall = {**val["recall"], pairid: val["recall"][pairid][:20] + ["dev-9999-9-img9"] + val["recall"][pairid][21:]}
    assert score(val, recall) == 0  # without --split the name is not checked (the gap --split closes)
    capsys.readouterr()
    assert score(val, recall, "--split", str(val["split"])) == 2
    err = capsys.readouterr().err
    assert f"pairid {pairid}: image(s) not in the split's image list {val['split']}: dev-9999-9-img9" in err, err
    assert "recall submission" in err and str(val["dir"] / "recall.json") in err and "1 problem(s)" in err
