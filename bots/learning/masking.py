"""Contact details are masked before anything trains on them, so the model can never learn
and repeat a link, an address, a phone number or a user handle.

Domains are recognised with tldextract's bundled copy of the Public Suffix List (every
public suffix: .shop, .dev, .ai, .fr, .co.uk, .social, IDN suffixes …) instead of a hand-kept
list of TLDs, which missed most of them. The extractor is built with no suffix-list URLs,
so it never fetches anything over the network, and with no cache directory, so it writes
nothing to disk.
"""
from __future__ import annotations

import functools
import re

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_SCHEME = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", re.IGNORECASE)
# a dotted name (with an optional port and path): a link when its last labels are a public suffix
_DOTTED = re.compile(r"(?<![\w@.-])((?:[\w-]+\.)+[\w-]+)(?::\d{1,5})?(/[^\s]*)?(?![\w-])")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_PHONE = re.compile(r"(?<![\w+])\+?\d(?:[\s().-]*\d){6,}(?!\w)")
_MENTION = re.compile(r"<@!?&?\d+>|(?<![\w@])@\w{2,}")


@functools.cache
def _extractor():
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


def is_domain(name: str) -> bool:
    """`name` (no scheme, no path) ends in a public suffix and has a registrable label, or is an IPv4 address."""
    if _IPV4.match(name):
        return True
    parts = _extractor()(name)
    return bool(parts.suffix and parts.domain and not parts.domain.isdigit())


def registered_domain(text: str) -> str | None:
    """"https://Shop.EvilPills.shop/x" → "evilpills.shop" (what coalition linking compares), or None."""
    host = re.sub(r"^(?:[a-z]+://)?(?:www\.)?", "", text.strip().lower()).split("/", 1)[0].split(":", 1)[0]
    if _IPV4.match(host):
        return host
    parts = _extractor()(host)
    return f"{parts.domain}.{parts.suffix}" if parts.suffix and parts.domain else None


def find_links(text: str) -> list[str]:
    """The links in `text` (with a scheme, www., or a bare domain with a public suffix), as written."""
    found = [m.group(0) for m in _SCHEME.finditer(text)]
    rest = _SCHEME.sub(" ", _EMAIL.sub(" ", text))
    found += [m.group(0) for m in _DOTTED.finditer(rest) if is_domain(m.group(1))]
    return found


def _link(match: re.Match) -> str:
    return "[link]" if is_domain(match.group(1)) else match.group(0)


def mask_contacts(text: str) -> str:
    """URLs and bare domains, e-mail addresses, phone numbers and @mentions replaced by a placeholder word."""
    text = _EMAIL.sub("[email]", text)
    text = _SCHEME.sub("[link]", text)
    text = _DOTTED.sub(_link, text)
    text = _MENTION.sub("[user]", text)
    return _PHONE.sub("[phone]", text)
