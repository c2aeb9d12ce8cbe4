import json

import pytest
import torch

from ldmkit import checkpoint as ck


def test_safetensors_round_trip(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    ck.save_safetensors(sd, tmp_path / "m.safetensors", {"stage": "x"})
    out = ck.load_safetensors(tmp_path / "m.safetensors")
    assert set(out) == {"a", "b"} and torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_state_is_weights_only(tmp_path):
    st = {"step": 3, "opt": {"lr": 0.1, "buf": torch.ones(2)}, "rng": torch.get_rng_state()}
    ck.save_state(st, tmp_path / "state.pt")
    back = ck.load_state(tmp_path / "state.pt")
    assert back["step"] == 3 and torch.equal(back["opt"]["buf"], torch.ones(2))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")  # an arbitrary object must never be unpickled
    with pytest.raises(ValueError, match="evil.pt"):
        ck.load_state(tmp_path / "evil.pt")


def test_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ck.save_state({"step": 1}, path)

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_state({"step": 2}, path)
    monkeypatch.undo()
    assert ck.load_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left behind


def test_json_atomic_and_errors(tmp_path):
    ck.write_json(tmp_path / "c.json", {"a": 1})
    assert ck.read_json(tmp_path / "c.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ck.read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ck.read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="junk.safetensors"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
        ck.load_safetensors(tmp_path / "junk.safetensors")


def test_provenance_and_hash(tmp_path):
    p = ck.provenance(data="shapes")
    assert p["torch"] == torch.__version__ and p["data"] == "shapes" and "ldmkit" in p
    (tmp_path / "f").write_bytes(b"abc")
    assert ck.file_hash(tmp_path / "f") == "ba7816bf8f01cfea"  # sha256("abc")
    json.dumps(p)


def test_safetensors_files_are_byte_identical_for_equal_weights(tmp_path):
    """safetensors writes its metadata in an arbitrary order; ldmkit canonicalises the header so that equal weights
    and metadata always give the same bytes (and so the same hash in pipeline.json)."""
    import torch
    from safetensors import safe_open

    from ldmkit.checkpoint import file_hash, load_safetensors, save_safetensors
    state = {"b": torch.arange(5.0), "a": torch.ones(3, 2, dtype=torch.bfloat16), "n": torch.tensor([3])}
    hashes = set()
    for i in range(6):
        meta = dict(reversed(list({"stage": "ldm", "step": "30", "z": str(i % 1)}.items()))) if i % 2 else \
            {"stage": "ldm", "step": "30", "z": "0"}
        save_safetensors(state, tmp_path / f"{i}.safetensors", meta)
        hashes.add(file_hash(tmp_path / f"{i}.safetensors"))
    assert len(hashes) == 1
    back = load_safetensors(tmp_path / "0.safetensors")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {"stage": "ldm", "step": "30", "z": "0"}
