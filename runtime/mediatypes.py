"""Which media a browser may render inline, and how downloads are labelled.

Uploaded files are served from the gateway's origin (embedded) or the bucket's.
A file a browser would execute there, such as SVG or HTML with scripts, must
never be rendered as a page: only plain raster images, audio and video are
served ``inline``; everything else is an ``attachment``, and local downloads
also carry ``nosniff`` and a sandboxing CSP.
"""

from __future__ import annotations

__all__ = ["INLINE_TYPES", "SAFE_HEADERS", "disposition", "normalize"]

INLINE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "audio/mpeg",
        "audio/ogg",
        "audio/wav",
        "audio/webm",
        "audio/mp4",
        "video/mp4",
        "video/webm",
        "video/ogg",
    }
)

SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cross-Origin-Resource-Policy": "cross-origin",
}


def normalize(content_type: str) -> str:
    """``Image/PNG; charset=x`` -> ``image/png``."""
    return content_type.split(";", 1)[0].strip().lower()


def disposition(content_type: str) -> str:
    return "inline" if normalize(content_type) in INLINE_TYPES else "attachment"
