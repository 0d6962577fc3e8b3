"""A Triton python-backend model with the pipeline models' interface that never finishes a request.

Each request is held on a thread until Triton tells the model it was cancelled (the client's
deadline or a closed stream); the model then writes ``cancelled-<n>`` into its model directory
and answers CANCELLED. Tests of deadlines put it where a slug's pipeline model would be, so a
deadline fires by construction, whatever the host's speed.
"""

import itertools
import threading
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils

HOLD_AT_MOST_S = 600.0  # a request nobody cancels is answered after this, so a broken test cannot hang Triton


class TritonPythonModel:
    def initialize(self, args):
        self.directory = Path(args["model_repository"])
        self.numbers = itertools.count()

    def execute(self, requests):
        for request in requests:
            (self.directory / f"received-{next(self.numbers)}").touch()
            threading.Thread(target=self._hold, args=(request.get_response_sender(),), daemon=True).start()
        return None

    def _hold(self, sender):
        start = time.monotonic()
        while not sender.is_cancelled():
            if time.monotonic() - start > HOLD_AT_MOST_S:
                error = pb_utils.TritonError("held too long", pb_utils.TritonError.INTERNAL)
                sender.send(pb_utils.InferenceResponse(error=error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            time.sleep(0.01)
        (self.directory / f"cancelled-{time.monotonic_ns()}").touch()
        error = pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
        try:
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # the stream is gone: nothing is left to answer
            pass
