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
                           '[learning]\nenabled = false\nmin_account_age_hours = 0\n[generation]\nmax_new_tokens = 6\n'
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
    await say(app, "alice", "tell me something about dogs")
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
    from bots.learning.export import allowed_dialogues, allowed_rows

    await say(app, "dave", "my name is Dave and I have a cat named Tom", chat="d", chat_type="private")
    await say(app, "dave", "tell me about my cat", chat="d", chat_type="private")
    assert "a cat named Tom" in app.chat.engine.systems[-1]
    answered = await say(app, "dave", "what is my cat called?", chat="d", chat_type="private")
    assert answered[0].text == "Your cat is Tom!"
    await say(app, "dave", "cats are great", chat="d", chat_type="private")
    async with app.store.db.transaction() as conn:      # every reply sent, as the adapter marks them
        await conn.execute("UPDATE messages SET status = 'ok' WHERE status = 'pending'")
    text = repr([row.text for row in (await allowed_rows(app.store, app.config.learning)).rows])
    assert "my name is Dave" in text                      # the user's own words are logged as ever ...
    assert "Facts the person" not in text and "pet: a cat" not in text      # ... the memory never,
    trained = repr([d.turns() for d in await allowed_dialogues(app.store, app.config.learning, [])])
    assert "my name is Dave" in trained and "cats are great" in trained
    assert "Your cat is Tom" not in trained and "what is my cat called" not in trained   # nor answers from it


@pytest.mark.parametrize("question, answer", [
    ("what is my name?", "You're Alice!"),
    ("Do you remember my name?", "You're Alice!"),
    ("what's my dog's name?", "Your dog is Rex!"),
    ("what is my cat called?", "You haven't told me about your cat yet. What's their name?"),
    ("which city do i live in?", "You live in Lyon."),
    ("where am i from?", "You haven't told me where you're from yet."),
    ("hey, what's my name and where do I live?", "You're Alice! You live in Lyon."),
    ("how old am i?", "You haven't told me how old you are."),
    ("I wonder what my name is", None),              # not a question to Mynah
    ("what is your name?", None),                    # about Mynah: the model answers
    ("what is my name? " + "blah " * 60, None),      # a long message is a conversation
])
def test_direct_questions_about_oneself_are_answered_from_the_facts(question, answer):
    from bots.chat.memory import asked_about, recall_answer

    facts = [("name", "Alice"), ("pet", "a dog named Rex"), ("home", "Lyon")]
    assert recall_answer(asked_about(question), facts) == answer


async def test_the_bot_answers_what_you_told_it_from_memory_each_their_own(app, tmp_path):
    before = len(app.chat.engine.systems)
    assert (await say(app, "erin", "what's my name?"))[0].text == "You haven't told me your name yet. What is it?"
    await say(app, "erin", "I'm Erin and I live in Oslo")
    await say(app, "finn", "my name is Finn")
    asked = len(app.chat.engine.systems)
    assert (await say(app, "erin", "what is my name?"))[0].text == "You're Erin!"
    assert (await say(app, "finn", "what is my name? where do i live?"))[0].text == (
        "You're Finn! You haven't told me where you live yet.")
    assert len(app.chat.engine.systems) == asked == before + 2     # the model was not asked
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    assert db.execute("SELECT text, model_version, status FROM messages WHERE role = 'bot' ORDER BY id DESC "
                      "LIMIT 1").fetchone() == ("You're Finn! You haven't told me where you live yet.", "memory",
                                                "pending")      # logged like any reply (sent by the adapter)
    await say(app, "erin", "/memory clear")
    assert (await say(app, "erin", "what is my name?"))[0].text.startswith("You haven't told me your name")


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
