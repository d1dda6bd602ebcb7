"""What every part of one explorer session reads: the shared model, its engine, and the images it measures on."""
from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import nn

from core.measure.accuracy import EvalData, eval_data, has_batchnorm
from core.method.engine import Engine
from core.method.snapshot import WeightSnapshot
from core.services.choices import LoadedModel
from core.workloads.data import CLASSES
from core.workloads.image_folder import ImageSet, for_model

_SNAPSHOTS: "weakref.WeakValueDictionary[str, WeightSnapshot]" = weakref.WeakValueDictionary()
_SNAPSHOTS_LOCK = threading.Lock()


def shared_snapshot(loaded: LoadedModel) -> WeightSnapshot:
    """The rank orders and chunks of ``loaded``'s model, built once per process while any session uses them."""
    with _SNAPSHOTS_LOCK:
        snapshot = _SNAPSHOTS.get(loaded.key)
        if snapshot is None:
            snapshot = WeightSnapshot(loaded.model, example_input=loaded.example_input(1))
            _SNAPSHOTS[loaded.key] = snapshot
        return snapshot


class SessionContext:
    """One session's model (shared, read-only), its engine over the shared snapshot, its data and its lock.

    The session's services (:mod:`core.services.session_repairs`, :mod:`core.services.session_accuracy`,
    :mod:`core.services.session_measurements`) hold this object, not the session, so that a closed
    session is freed at once (no reference cycle).
    """

    def __init__(self, loaded: LoadedModel, device: str = "cpu"):
        self.loaded = loaded
        self.device = device
        self.engine = Engine.sharing(shared_snapshot(loaded), lend_buffers=True)
        self.lock = threading.RLock()  # one per session: the engine's buffer, the data, the repair job waited for
        self.has_batchnorm = has_batchnorm(loaded.model)
        self.params = sum(p.numel() for p in loaded.model.parameters())
        self.data: ImageSet | None = None  # the user's images, labels mapped to the model's outputs
        self.data_warnings: list[str] = []
        self._data_given: str | None = None  # the key of the set last given to set_data
        self._dense_on: dict[str, nn.Module] = {}

    @property
    def key(self) -> str:
        return self.loaded.key

    @property
    def evaluates_cifar(self) -> bool:
        return self.loaded.input_kind == "cifar10"

    @property
    def has_labels(self) -> bool:
        """Accuracy can be measured: labelled user images, or (without user images) a CIFAR-10 model."""
        return self.data.labelled if self.data is not None else self.evaluates_cifar

    @property
    def data_key(self) -> str:
        return self.data.key if self.data is not None else "default"

    def labelled_data(self) -> EvalData | None:
        """The labelled images accuracy is measured on in full: the user's, else CIFAR-10's test set for a
        CIFAR-10 model, else None."""
        if self.data is not None and self.data.labelled:
            return EvalData(self.data.images, self.data.labels, "user")
        if self.evaluates_cifar:
            return eval_data("test", self.loaded.mean, self.loaded.std)
        return None

    def data_label(self) -> str:
        """What the accuracy is measured on, in words."""
        if self.data is not None:
            return f"your images ({len(self.data):,}, {self.data.source})"
        return "the CIFAR-10 test set (JPEG copy)"

    def num_outputs(self) -> int:
        """The model's number of outputs (classes), from one forward pass of the example input."""
        with torch.inference_mode():
            return int(self.loaded.model(self.loaded.example_input(1)).shape[-1])

    def set_data(self, images: ImageSet | None) -> bool:
        """Measure on ``images`` from now on (None: the default data); False if they are the set last given.

        Class folders are mapped to the model's outputs (:func:`core.workloads.image_folder.for_model`);
        the warnings land in :attr:`data_warnings`. Call it holding :attr:`lock`.
        """
        given = None if images is None else images.key
        if given == self._data_given:
            return False
        if images is None:
            self.data, self.data_warnings = None, []
        else:
            categories = self.loaded.categories or (CLASSES if self.evaluates_cifar else ())
            self.data, self.data_warnings = for_model(images, categories, self.num_outputs())
        self._data_given = given
        return True

    def dense_model(self, device: str) -> nn.Module:
        """The dense model on ``device``: the shared model itself on CPU (only run, never changed), a private copy elsewhere."""
        if device == "cpu":
            return self.loaded.model
        if device not in self._dense_on:
            with torch.no_grad():
                self._dense_on[device] = copy.deepcopy(self.loaded.model).to(device).eval()
        return self._dense_on[device]
