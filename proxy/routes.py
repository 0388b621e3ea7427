"""OpenAI's route templates, for bounded metric labels: `/v1/files/file-abc` → `/v1/files/{id}`.

Metric label values must come from a fixed set, or anyone (without a key) can
grow `/metrics` without limit by asking for `/v1/<random>`. A request path is
matched segment by segment against the templates below (a literal segment
first, else `{id}`, which matches any one segment); anything else is `other`.
"""

from __future__ import annotations

OTHER = "other"
# Methods that read or remove: they run no model and cost nothing (spend control).
READ_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

# The public OpenAI REST API (openai/openai-openapi), object ids as `{id}`.
TEMPLATES = (
    "/v1/chat/completions",
    "/v1/chat/completions/{id}",
    "/v1/chat/completions/{id}/messages",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/responses/{id}",
    "/v1/responses/{id}/cancel",
    "/v1/responses/{id}/input_items",
    "/v1/conversations",
    "/v1/conversations/{id}",
    "/v1/conversations/{id}/items",
    "/v1/conversations/{id}/items/{id}",
    "/v1/files",
    "/v1/files/{id}",
    "/v1/files/{id}/content",
    "/v1/uploads",
    "/v1/uploads/{id}/parts",
    "/v1/uploads/{id}/complete",
    "/v1/uploads/{id}/cancel",
    "/v1/batches",
    "/v1/batches/{id}",
    "/v1/batches/{id}/cancel",
    "/v1/fine_tuning/jobs",
    "/v1/fine_tuning/jobs/{id}",
    "/v1/fine_tuning/jobs/{id}/cancel",
    "/v1/fine_tuning/jobs/{id}/events",
    "/v1/fine_tuning/jobs/{id}/checkpoints",
    "/v1/fine_tuning/jobs/{id}/pause",
    "/v1/fine_tuning/jobs/{id}/resume",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/vector_stores",
    "/v1/vector_stores/{id}",
    "/v1/vector_stores/{id}/search",
    "/v1/vector_stores/{id}/files",
    "/v1/vector_stores/{id}/files/{id}",
    "/v1/vector_stores/{id}/files/{id}/content",
    "/v1/vector_stores/{id}/file_batches",
    "/v1/vector_stores/{id}/file_batches/{id}",
    "/v1/vector_stores/{id}/file_batches/{id}/cancel",
    "/v1/vector_stores/{id}/file_batches/{id}/files",
    "/v1/assistants",
    "/v1/assistants/{id}",
    "/v1/threads",
    "/v1/threads/runs",
    "/v1/threads/{id}",
    "/v1/threads/{id}/messages",
    "/v1/threads/{id}/messages/{id}",
    "/v1/threads/{id}/runs",
    "/v1/threads/{id}/runs/{id}",
    "/v1/threads/{id}/runs/{id}/cancel",
    "/v1/threads/{id}/runs/{id}/submit_tool_outputs",
    "/v1/threads/{id}/runs/{id}/steps",
    "/v1/threads/{id}/runs/{id}/steps/{id}",
    "/v1/containers",
    "/v1/containers/{id}",
    "/v1/containers/{id}/files",
    "/v1/containers/{id}/files/{id}",
    "/v1/containers/{id}/files/{id}/content",
    "/v1/realtime/sessions",
    "/v1/realtime/transcription_sessions",
    "/v1/realtime/client_secrets",
    "/v1/evals",
    "/v1/evals/{id}",
    "/v1/evals/{id}/runs",
    "/v1/evals/{id}/runs/{id}",
    "/v1/videos",
    "/v1/videos/{id}",
    "/v1/videos/{id}/content",
)

_Node = dict[str, "_Node"]
_END = "\0"  # a child key no segment can be: marks the end of a template


def _build() -> _Node:
    root: _Node = {}
    for template in TEMPLATES:
        node = root
        for segment in template.strip("/").split("/"):
            node = node.setdefault(segment, {})
        node[_END] = {}
    return root


_TREE = _build()


_KNOWN: dict[str, str] = {}  # paths seen that matched a template (bounded below)


def template(path: str) -> str:
    """The template `path` matches, or `other`."""
    found = _KNOWN.get(path)
    if found is None:
        found = _match(path)
        if found != OTHER and len(path) <= 200:
            if len(_KNOWN) >= 10_000:
                _KNOWN.clear()
            _KNOWN[path] = found
    return found


def _match(path: str) -> str:
    node: _Node | None = _TREE
    segments = path.strip("/").split("/")
    if len(segments) > 8:
        return OTHER
    matched = []
    for segment in segments:
        assert node is not None
        if not segment:
            return OTHER
        child = node.get(segment) if segment != _END else None
        if child is not None:
            matched.append(segment)
        else:
            child = node.get("{id}")
            if child is None:
                return OTHER
            matched.append("{id}")
        node = child
    if node is None or _END not in node:
        return OTHER
    return "/" + "/".join(matched)
