"""Per-user memory: facts users state about themselves, extracted by rules, stored per user,
put in the system prompt (each speaker their own), shown by /memory, cleared by /memory clear
and /forget, and never trained on."""
from __future__ import annotations

import itertools
import sqlite3

import pytest

from bots.chat.memory import extract_facts, memory_prompt
from tests.conftest import build_gguf_llama

IDS = itertools.count(1)


@pytest.mark.parametrize("text, facts", [
    ("hi, my name is Alice", [("name", "Alice")]),
    ("Hello! I'm Bob and I live in New York.", [("name", "Bob"), ("home", "New York")]),
    ("call me sam", [("name", "Sam")]),
    ("I'm tired today", []),
    ("I'm Good, thanks", []),
    ("my dog is called Rex", [("pet", "a dog named Rex")]),
    ("I have a cat named whiskers and I love hiking", [("pet", "a cat named Whiskers"), ("like", "hiking")]),
    ("my little hamster's name is Nibbles", [("pet", "a hamster named Nibbles")]),
    ("i moved to Lyon last year", []),                      # "last year" follows: no clean end, no guess
    ("I moved to Lyon, it's lovely", [("home", "Lyon")]),
    ("I'm from Osaka but I live in Berlin", [("from", "Osaka"), ("home", "Berlin")]),
    ("i really like to read books.", [("like", "read books")]),
    ("I love you", []),
    ("what is my name?", []),                                # a question states nothing
    ("I am 29 years old and I work as a nurse", [("age", "29"), ("job", "nurse")]),
])
def test_rules_extract_what_users_say_about_themselves(text, facts):
    assert extract_facts(text) == facts


def test_the_prompt_part_labels_the_facts_as_the_speakers():
    part = memory_prompt([("name", "Alice"), ("pet", "a dog named Rex"), ("home", "Paris")])
    assert part.startswith("Facts the person you are talking to told you about themselves: name: Alice; "
                           "pet: a dog named Rex; lives in: Paris.")
    assert memory_prompt([]) == ""


class Spy:
    """The real engine, with the system prompts it was given noted down."""

    def __init__(self, engine):
        self.engine, self.systems = engine, []

    async def reply(self, history, overrides=None, *, system="", route=None):
        self.systems.append(system)
        return await self.engine.reply(history, overrides, system=system, route=route)

    def stream(self, history, overrides=None, *, system="", route=None):
        self.systems.append(system)
        return self.engine.stream(history, overrides, system=system, route=route)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture
async def app(tmp_path):
    from bots.app import Mynah
    from bots.config import load_config

    gguf_file, _ = build_gguf_llama(tmp_path / "tiny.gguf")
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[model]\npath = "{gguf_file}"\n[storage]\npath = "{tmp_path / "db.sqlite3"}"\n'
                           '[learning]\nenabled = false\n[generation]\nmax_new_tokens = 6\n'
                           '[chat]\nstream = false\ndefault_persona = "You are Mynah."\n', encoding="utf-8")
    app = await Mynah.open(load_config(config_file))
    app.chat.engine = Spy(app.chat.engine)
    try:
        yield app
    finally:
        await app.close()


async def say(app, user: str, text: str, chat: str = "group1", chat_type: str = "group"):
    from bots.chat.events import Incoming

    msg = Incoming("telegram", chat, user, text, chat_type=chat_type, user_name=user, mentions_bot=True,
                   message_id=f"m{next(IDS)}")
    return await app.chat.handle(msg)


async def test_each_speaker_gets_their_own_facts_and_memory_commands_work(app, tmp_path):
    await say(app, "alice", "hi, my name is Alice and my dog is called Rex")
    assert "name: Alice; pet: a dog named Rex" in app.chat.engine.systems[-1]   # used at once
    assert app.chat.engine.systems[-1].startswith("You are Mynah.")             # the persona is kept
    await say(app, "bob", "I'm Bob. I live in Paris")
    bob_prompt = app.chat.engine.systems[-1]
    assert "name: Bob; lives in: Paris" in bob_prompt and "Alice" not in bob_prompt and "Rex" not in bob_prompt
    await say(app, "alice", "what is my dog called?")
    assert "Rex" in app.chat.engine.systems[-1] and "Paris" not in app.chat.engine.systems[-1]

    shown = (await say(app, "alice", "/memory"))[0]
    assert "- name: Alice" in shown.text and "- pet: a dog named Rex" in shown.text and shown.private
    cleared = (await say(app, "alice", "/memory clear"))[0]
    assert "forgot the 2 things" in cleared.text
    assert "don't remember anything" in (await say(app, "alice", "/memory"))[0].text
    await say(app, "alice", "ok")
    assert app.chat.engine.systems[-1] == "You are Mynah."

    # /forget deletes the memory with the messages; Bob's stays
    await say(app, "bob", "/forget", chat="bob-dm", chat_type="private")
    assert await app.store.memory.facts("telegram", "bob") == []
    await say(app, "carol", "my name is Carol")
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    assert db.execute("SELECT kind, value FROM user_facts").fetchall() == [("name", "Carol")]


async def test_memory_is_never_in_the_training_data(app, tmp_path):
    from bots.learning.export import allowed_rows

    await say(app, "dave", "my name is Dave and I have a cat named Tom", chat="d", chat_type="private")
    await say(app, "dave", "what is my cat called", chat="d", chat_type="private")
    assert "a cat named Tom" in app.chat.engine.systems[-1]
    text = repr([row.text for row in (await allowed_rows(app.store, app.config.learning)).rows])
    assert "my name is Dave" in text                      # the user's own words are logged as ever ...
    assert "Facts the person" not in text and "pet: a cat" not in text      # ... the memory never


async def test_name_is_replaced_pets_accumulate(tmp_path):
    from storage.store import open_store

    store = await open_store(tmp_path / "db.sqlite3")
    try:
        uid = await store.chats.user("console", "u1")
        await store.memory.remember(uid, [("name", "Al"), ("pet", "a dog named Rex")])
        await store.memory.remember(uid, [("name", "Alice"), ("pet", "a cat named Tom")])
        assert sorted(await store.memory.facts("console", "u1")) == [("name", "Alice"), ("pet", "a cat named Tom"),
                                                                     ("pet", "a dog named Rex")]
    finally:
        await store.close()
