"""Contact masking with the Public Suffix List: every suffix and shape in the table is masked,
ordinary text (decimals, abbreviations, file names) is left alone."""
from __future__ import annotations

import socket

import pytest

from bots.learning.masking import find_links, mask_contacts, registered_domain

# (text, the secret that must not survive, the placeholder that replaces it)
TABLE = [
    ("buy at evilpills.shop now", "evilpills", "[link]"),
    ("my site is jane.dev", "jane.dev", "[link]"),
    ("try chat.openbot.ai for free", "openbot", "[link]"),
    ("voir boutique.fr demain", "boutique", "[link]"),
    ("see maple.ca eh", "maple", "[link]"),
    ("kijk op fietsen.nl", "fietsen", "[link]"),
    ("follow me on toot.social", "toot.social", "[link]"),
    ("news at bbc.co.uk today", "bbc", "[link]"),
    ("store.example.com.au has it", "example", "[link]"),
    ("join t.me/cheapdeals", "cheapdeals", "[link]"),
    ("go to cheap.xyz", "cheap.xyz", "[link]"),
    ("deals at bargain.store", "bargain", "[link]"),
    ("it is on loans.online", "loans", "[link]"),
    ("visit wallet.crypto.io/claim?id=7", "wallet", "[link]"),
    ("my blog: words.blog", "words.blog", "[link]"),
    ("casino at luck.bet tonight", "luck.bet", "[link]"),
    ("sale on shoes.de und mehr", "shoes.de", "[link]"),
    ("EvilPills.SHOP has it", "EvilPills", "[link]"),
    ("пример.рф is russian", "пример", "[link]"),
    ("https://anything.example/path?q=1", "anything", "[link]"),
    ("www.spam.zz is odd", "spam", "[link]"),
    ("ping 192.168.10.20:8080/admin", "192.168", "[link]"),
    ("server at portal.gov.uk:443/login", "portal", "[link]"),
    ("mail me: jane.doe+x@example.co.uk", "jane.doe", "[email]"),
    ("write to boss@evilpills.shop", "boss", "[email]"),
    ("call +44 20 7946 0958 today", "7946", "[phone]"),
    ("call (555) 123-4567", "4567", "[phone]"),
    ("ask @bigseller about it", "bigseller", "[user]"),
    ("hey <@123456789>", "123456789", "[user]"),
]


@pytest.mark.parametrize("text,secret,placeholder", TABLE)
def test_every_suffix_and_shape_is_masked(text, secret, placeholder):
    masked = mask_contacts(text)
    assert secret not in masked and placeholder in masked, masked


def test_the_table_is_broad():
    suffixes = {t.split()[0] for t, _, p in TABLE if p == "[link]"}
    assert len(TABLE) >= 20 and len(suffixes) >= 15


@pytest.mark.parametrize("text", ["i am 25 years old and have 3 dogs", "pi is 3.14 or so", "e.g. this, i.e. that",
                                  "open notes.txt please", "version 1.2.3 is out", "ok.", "wait...what"])
def test_ordinary_text_is_left_alone(text):
    assert mask_contacts(text) == text


def test_registered_domain_and_find_links():
    assert registered_domain("https://Shop.EvilPills.shop/x") == "evilpills.shop"
    assert registered_domain("www.bbc.co.uk") == "bbc.co.uk"
    assert registered_domain("notes.txt") is None
    assert find_links("see evilpills.shop and https://x.example/a, not 3.14") == ["https://x.example/a,",
                                                                                   "evilpills.shop"]


def test_masking_never_touches_the_network(monkeypatch):
    """The bundled suffix list only: any socket use fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("masking tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    from bots.learning import masking

    masking._extractor.cache_clear()
    assert mask_contacts("new suffix: evilpills.shop") == "new suffix: [link]"
