import io

import pytest
import torch

from core.workloads.models import CheckpointError, build
from core.services.uploads import read_upload


class _Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_read_upload_rejects_bad_files(tmp_path):
    good = build("resnet20").state_dict()
    buffer = io.BytesIO()
    torch.save(good, buffer)
    data = buffer.getvalue()
    assert read_upload(data, "ok.pt", "resnet20").arch == "resnet20"
    with pytest.raises(CheckpointError, match="limit"):
        read_upload(data, "big.pt", "resnet20", max_bytes=1000)
    with pytest.raises(CheckpointError, match="empty"):
        read_upload(b"", "empty.pt", "resnet20")
    with pytest.raises(CheckpointError, match="does not fit"):
        read_upload(data, "wrong.pt", "cifar_cnn")
    with pytest.raises(CheckpointError, match="architecture"):
        read_upload(data, "plain.pt", None)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_upload(data[: len(data) // 2], "truncated.pt", "resnet20")
    pickled = io.BytesIO()
    torch.save({"weights": good, "extra": _Payload()}, pickled)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_upload(pickled.getvalue(), "pickled.pt", "resnet20")
    nan_state = {k: v.clone() for k, v in good.items()}
    nan_state["fc.weight"][0, 0] = float("nan")
    buffer = io.BytesIO()
    torch.save(nan_state, buffer)
    with pytest.raises(CheckpointError, match="NaN"):
        read_upload(buffer.getvalue(), "nan.pt", "resnet20")
    from safetensors.torch import save as save_safetensors

    assert read_upload(save_safetensors({k: v.contiguous() for k, v in good.items()}), "ok.safetensors",
                       "resnet20").arch == "resnet20"
