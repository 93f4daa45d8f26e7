"""Typed exceptions for the daemon's `{"error": {"code", "message"}}` answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Type


class MoatError(Exception):
    """Any error the daemon answered (or failing to reach it).

    ``status`` is the HTTP status (``None`` when there was no answer, or when an error arrived
    inside a streamed exec), ``code`` the daemon's stable machine-readable code
    (``bad_request``, ``not_found``, …) and ``message`` its explanation for people.
    """

    def __init__(self, status: Optional[int], code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class BadRequest(MoatError):
    """400: the request was invalid; the message says what was wrong and what is allowed."""


class Unprocessable(BadRequest):
    """422 ``unprocessable``: the request is well-formed by the OpenAPI document, but a rule the
    document cannot state refuses it (one field excludes another, an egress rule that can
    never match, a policy that does not compile); the message names the rule. A subclass of
    BadRequest: either way the request must change."""


class Unauthorized(MoatError):
    """401: no API key, or one the daemon does not know."""


class Forbidden(MoatError):
    """403: the key's role does not allow this (e.g. a reader creating a sandbox)."""


@dataclass(frozen=True)
class PolicyFinding:
    """One reason a group's policy refused a request: a stable rule id (``command.denied``,
    ``python.process``, … see docs/POLICY.md), a message, and where in the code it is (1-based
    line and column, or None for findings about the request itself) with that line."""

    rule: str
    message: str
    line: Optional[int]
    column: Optional[int]
    snippet: str


class PolicyDenied(Forbidden):
    """403 ``policy_denied``: the group's policy refused the request before it reached the
    sandbox. ``findings`` say why; ``policy_version`` is the version that decided."""

    def __init__(
        self,
        status: Optional[int],
        code: str,
        message: str,
        findings: List[PolicyFinding],
        policy_version: Optional[int],
    ) -> None:
        super().__init__(status, code, message)
        self.findings = findings
        self.policy_version = policy_version


def parse_finding(d: Dict[str, Any]) -> PolicyFinding:
    return PolicyFinding(
        rule=str(d["rule"]),
        message=str(d["message"]),
        line=d.get("line"),
        column=d.get("column"),
        snippet=str(d.get("snippet", "")),
    )


class NotFound(MoatError):
    """404: no such group, sandbox, file or process, or one the key cannot see."""


class MethodNotAllowed(MoatError):
    """405."""


class Conflict(MoatError):
    """409: the resource is in a state that does not allow this (or a wait ran out)."""


class PayloadTooLarge(MoatError):
    """413: the request body or an exec's collected output is too large."""


class TooManyRequests(MoatError):
    """429: the host is full; retry later."""


CapacityError = TooManyRequests


class RateLimited(TooManyRequests):
    """429 ``rate_limited``: this API key is over its rate limit; the answer's ``Retry-After``
    says when to try again."""


class InternalError(MoatError):
    """500: the daemon failed; the details are in its log."""


class BadGateway(MoatError):
    """502 ``bad_gateway`` (told by its code: a proxy's own 502 is an InternalError): the
    sandbox's agent did not answer or broke the protocol (the sandbox's ``health`` says so, and
    the daemon reconnects or fails it), a port of the sandbox could not be reached, or the
    fleet node that runs the sandbox could not be reached (the message names it)."""


class OtherNode(MoatError):
    """421 ``other_node``: a request one node of the fleet forwarded reached a node that does
    not run the sandbox (requests are forwarded once, never twice); the message names the node
    that runs it and its URL."""


class Unavailable(MoatError):
    """503: the daemon cannot do this now (store busy, sandboxes being prepared, no VM runtime,
    the fleet node that runs the sandbox lost); retry."""


class NoSpace(MoatError):
    """507: the sandbox's disk is full."""


class ConnectionFailed(MoatError):
    """The daemon could not be reached, or the connection broke off (``status`` is None)."""


_BY_STATUS: Dict[int, Type[MoatError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    421: OtherNode,
    422: Unprocessable,
    429: TooManyRequests,
    500: InternalError,
    503: Unavailable,
    507: NoSpace,
}

_BY_CODE: Dict[str, Type[MoatError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "other_node": OtherNode,
    "unprocessable": Unprocessable,
    "too_many_requests": TooManyRequests,
    "internal": InternalError,
    "bad_gateway": BadGateway,
    "unavailable": Unavailable,
    "no_space": NoSpace,
}


def error_from_response(status: int, body: bytes) -> MoatError:
    """The exception for an error answer. A body that is not the daemon's error shape (a proxy
    in between, say) still gives an exception of the status's class, with the body as message."""
    code, message = f"http_{status}", ""
    detail: Any = None
    try:
        detail = json.loads(body)["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        message = body[:500].decode("utf-8", "replace").strip() or f"HTTP status {status}"
    if code == "policy_denied" and isinstance(detail, dict):
        try:
            findings = [parse_finding(f) for f in detail.get("findings") or []]
        except (KeyError, TypeError):
            findings = []
        version = detail.get("policy_version")
        return PolicyDenied(
            status, code, message, findings, version if isinstance(version, int) else None
        )
    if code == "rate_limited":
        return RateLimited(status, code, message)
    cls = _BY_STATUS.get(status) or _BY_CODE.get(code)
    if cls is None:
        cls = InternalError if status >= 500 else MoatError
    return cls(status, code, message)


def error_from_frame(detail: object) -> MoatError:
    """The exception for an ``{"error": {...}}`` line of a streamed exec (no status of its own)."""
    if isinstance(detail, dict):
        code, message = str(detail.get("code", "internal")), str(detail.get("message", ""))
    else:
        code, message = "internal", f"malformed error frame: {detail!r}"
    return _BY_CODE.get(code, MoatError)(None, code, message)
