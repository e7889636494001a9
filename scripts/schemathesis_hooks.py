"""schemathesis hooks for scripts/schemathesis.sh.

An exec or session exec without a timeout (or with one over EXEC_TIMEOUT_CAP_SEC) gets that cap, so
an example like `sleep 3600` costs seconds of the budget rather than the default 30. In the pass that
targets a running sandbox, every request to a /sandboxes/{id}/... operation names the sandbox in
VOIDRUN_FUZZ_SANDBOX, so the generated commands, paths and bodies reach its agent instead of
stopping at a 404.

The image import takes a tar or gzip body (`application/x-tar`, `application/gzip`): the generated
bytes go as they are, as for `application/octet-stream` (schemathesis has no serializer for those
media types of its own and would report the operation as untestable).
"""

import os

import schemathesis

SANDBOX = os.environ.get("VOIDRUN_FUZZ_SANDBOX", "")
EXEC_TIMEOUT_CAP_SEC = 3
EXEC_PATHS = ("/exec", "/exec-stream", "/session-exec", "/session-exec-stream")

schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
schemathesis.serializer.alias("application/gzip", "application/octet-stream")


@schemathesis.hook
def map_case(context, case):
    path = case.operation.path
    if SANDBOX and case.path_parameters and "id" in case.path_parameters and path.startswith("/sandboxes/{id}"):
        case.path_parameters["id"] = SANDBOX
    if path.endswith(EXEC_PATHS) and isinstance(case.body, dict) and "command" in case.body:
        timeout = case.body.get("timeout")
        if timeout is None or (type(timeout) in (int, float) and (timeout == 0 or timeout > EXEC_TIMEOUT_CAP_SEC)):
            case.body["timeout"] = EXEC_TIMEOUT_CAP_SEC
    return case
