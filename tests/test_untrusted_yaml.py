"""Hostile and malformed YAML, and literal secrets: one table row per rule (core.safe_yaml, core.secrets_guard).

Every row is input -> expected error substring, or input -> the data it must load to. Nothing here needs
Slurm, torch or a fast machine: limits are checked by what the loader reports, not by timing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core import safe_yaml
from core.safe_yaml import MAX_BYTES, MAX_DEPTH, MAX_NODES, YamlError, load_yaml
from core.secrets_guard import HIDDEN, redact, safe_quote, secret_paths

REPO = Path(__file__).resolve().parent.parent


class Err(str):
    """Expected: load_yaml raises YamlError whose message contains this text."""


# Fake credentials, assembled at run time so no scanner mistakes this file for a leak.
HF = "hf_" + "abcdefghijklmnopqrstuvwxyz0123456789"
GHP = "ghp_" + "A1b2" * 9
GHPAT = "github_" + "pat_" + "11ABCDEFG0" + "x" * 30
SK = "sk-" + "proj-" + "Z9" * 12
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
SLACK = "xoxb-" + "123456789012-abcdefABCDEF"
PEM = "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA " + "PRIVATE KEY-----\n"

SPEC = """\
# an ordinary job spec
name: smoke
workload: smoke
defaults: &res {nodes: 1, tasks_per_node: 2}
resources:
  <<: *res
  time: "00:05:00"
train: {steps: 10, lr: 5.0e-5, seed: null, resume: false}
env: {HF_TOKEN: "${env:HF_TOKEN}"}
items: [a, 'b', "c", 1, 2.5, ~, yes]
"""
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))  # 9**9 values
DEEP_ALIAS = "x: &l " + "[" * 60 + "1" + "]" * 60 + "\ny: [[[[[[*l]]]]]]\n"
BLOCK_DEEP = "".join(" " * i + "k:\n" for i in range(300)) + " " * 300 + "v\n"

YAML_ROWS = [
    pytest.param(SPEC, yaml.safe_load(SPEC), id="ordinary-spec"),
    pytest.param(SPEC.encode(), yaml.safe_load(SPEC), id="ordinary-spec-bytes"),
    pytest.param(b"\xef\xbb\xbfa: 1\n", {"a": 1}, id="utf8-bom"),
    pytest.param("a: &x [1, 2]\nb: *x\n", {"a": [1, 2], "b": [1, 2]}, id="small-alias"),
    pytest.param("", None, id="empty"),
    pytest.param("[" * MAX_DEPTH + "]" * MAX_DEPTH, yaml.safe_load("[" * MAX_DEPTH + "]" * MAX_DEPTH), id="depth-at-limit"),
    pytest.param("d: {a: 1, b: 2}\ne: {a: 1, b: 2}\n", {"d": {"a": 1, "b": 2}, "e": {"a": 1, "b": 2}}, id="same-keys-in-siblings"),
    pytest.param("b: &b {a: 1}\nd: {<<: *b, a: 5}\n", {"b": {"a": 1}, "d": {"a": 5}}, id="merge-key-override-is-not-duplicate"),
    pytest.param(BOMB, Err(f"more than {MAX_NODES} values"), id="billion-laughs"),
    pytest.param("a: &x [*x]\n", Err("line 1, column 8: alias '*x' refers to the list or mapping that contains it"), id="self-alias-list"),
    pytest.param("a: &x {b: {c: *x}}\n", Err("recursive alias"), id="self-alias-mapping"),
    pytest.param("[" * 2000 + "]" * 2000, Err(f"nested more than {MAX_DEPTH} deep"), id="2000-deep-flow"),
    pytest.param("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), Err(f"column {MAX_DEPTH + 1}: lists/mappings nested"), id="depth-over-limit"),
    pytest.param(BLOCK_DEEP, Err(f"nested more than {MAX_DEPTH} deep"), id="300-deep-block"),
    pytest.param(DEEP_ALIAS, Err(f"aliases expand to lists/mappings nested more than {MAX_DEPTH}"), id="deep-through-aliases"),
    pytest.param(b"name: caf\xe9\n", Err("not UTF-8 at byte 9; save the file as UTF-8"), id="latin1-bytes"),
    pytest.param(b"a: \xff\xfe", Err("not UTF-8 at byte 3"), id="garbage-bytes"),
    pytest.param("nodes: 1\nname: x\nnodes: 2\n", Err("line 3, column 1: duplicate key 'nodes' at lines 1 and 3; keep one"), id="dup-top"),
    pytest.param("name: x\nresources:\n  nodes: 1\n  time: 1\n  nodes: 2\n", Err("duplicate key 'nodes' at lines 3 and 5"), id="dup-nested"),
    pytest.param("items:\n  - {a: 1, a: 2}\n", Err("duplicate key 'a' at lines 2 and 2"), id="dup-in-list-flow"),
    pytest.param("x" * (MAX_BYTES + 1), Err(f"{MAX_BYTES + 1} bytes is over the {MAX_BYTES}-byte (1 MiB) limit"), id="oversize-str"),
    pytest.param(b"#" * (MAX_BYTES + 1), Err("over the 1048576-byte"), id="oversize-bytes"),
    pytest.param("a: b: c\n", Err("line 1, column 5: mapping values are not allowed here"), id="syntax"),
    pytest.param("a: [1\nb: 2\n", Err("expected ',' or ']'"), id="unclosed-flow"),
    pytest.param("\ta: 1\n", Err("line 1, column 1: while scanning for the next token; found character '\\t'"), id="tab"),
    pytest.param("a: !!python/object/apply:os.system [ls]\n", Err("could not determine a constructor"), id="python-tag"),
    pytest.param("a: 1\n---\nb: 2\n", Err("expected a single document"), id="two-documents"),
    pytest.param("a: *nope\n", Err("found undefined alias 'nope'"), id="undefined-alias"),
    pytest.param("a: 1\nb: \x1b[31m\n", Err("line 2, column 4: character \\x1b (code 27) is not allowed"), id="control-char"),
    pytest.param("n: " + "1" * 5000 + "\n", Err("line 1, column 4: cannot read value"), id="huge-int"),
    pytest.param("d: 2024-02-30\n", Err("cannot read value: day is out of range"), id="bad-date"),
]


@pytest.mark.parametrize("data, expected", YAML_ROWS)
def test_load_yaml(data, expected):
    if not isinstance(expected, Err):
        assert load_yaml(data, "spec.yaml") == expected
        return
    with pytest.raises(YamlError) as info:
        load_yaml(data, "spec.yaml")
    message = str(info.value)
    assert expected in message
    assert message.startswith("spec.yaml: ") and "\n" not in message and ";" in message  # one line, with a fix
    assert isinstance(info.value, ValueError)


def test_alias_bomb_is_refused_before_anything_is_built(monkeypatch):
    def never(self, node):
        raise AssertionError("constructed a document that should have been refused")
    monkeypatch.setattr(safe_yaml._Loader, "construct_document", never)
    with pytest.raises(YamlError, match=f"more than {MAX_NODES} values"):
        load_yaml(BOMB, "bomb.yaml")
    assert len(BOMB) < 1024


SHIPPED = sorted([*REPO.glob("jobs/**/*.yaml"), *REPO.glob("cluster_configs/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_files_load_as_safe_load_and_hold_no_secrets(path):
    raw = path.read_bytes()
    data = load_yaml(raw, str(path))
    assert data == yaml.safe_load(raw)
    assert secret_paths(data) == []


def test_shipped_files_exist():
    assert len(SHIPPED) >= 4


SECRET_KEYS = ["hfToken", "accessToken", "PGPASSWORD", "GITHUB_PAT", "api.key", "AWS_SECRET_ACCESS_KEY", "x-api-key",
               "HF_TOKEN", "apiKey", "password", "db_passwd", "pwd", "client_secret", "credentials", "auth",
               "bearer", "private_key", "key", "AWS_ACCESS_KEY_ID"]
INNOCENT_KEYS = ["tokenizer", "tokenizer_path", "max_tokens", "max_new_tokens", "max_prompt_tokens",
                 "max_report_tokens", "monkey", "keyboard_layout", "eos_token_id", "pad_token", "num_key_value_heads",
                 "author", "path", "patch_dim", "description"]

SECRET_ROWS = [
    *[pytest.param({"env": {k: "s3cr3t-value"}}, [f"env.{k}"], id=f"refused-{k}") for k in SECRET_KEYS],
    *[pytest.param({"model": {k: "/data/tok" if "tok" in k else 300}}, [], id=f"accepted-{k}") for k in INNOCENT_KEYS],
    pytest.param({"env": {"HF_TOKEN": "${env:HF_TOKEN}"}}, [], id="env-reference"),
    pytest.param({"hf": {"token": "${file:/home/u/.hf}"}}, [], id="file-reference"),
    pytest.param({"env": {"HF_TOKEN": "${env:HF_TOKEN} x"}}, ["env.HF_TOKEN"], id="reference-plus-text"),
    pytest.param({"env": {"HF_TOKEN": "${env:}"}}, ["env.HF_TOKEN"], id="empty-reference"),
    pytest.param({"env": {"HF_TOKEN": "$HF_TOKEN"}}, ["env.HF_TOKEN"], id="shell-reference"),
    pytest.param({"a": {"token": None, "secret": "", "password": "  "}}, [], id="null-or-empty"),
    pytest.param({"auth": {"password": ["p1", "p2"]}}, ["auth"], id="dict-under-secret-key-once"),
    pytest.param({"db": {"password": ["p1", {"x": "p2"}]}}, ["db.password"], id="list-under-secret-key"),
    pytest.param({"db": {"password": 123456}}, ["db.password"], id="int-under-secret-key"),
    pytest.param({"db": {"password": 1.5}}, ["db.password"], id="float-under-secret-key"),
    pytest.param({"db": {"private": True}}, ["db.private"], id="bool-under-secret-key"),
    pytest.param({"description": f"my {HF}"}, ["description"], id="hf-shape"),
    pytest.param({"a": {"b": [0, 1, GHP]}}, ["a.b[2]"], id="github-shape-in-list"),
    pytest.param({"note": GHPAT}, ["note"], id="github-pat-shape"),
    pytest.param({"setup": [f"export OPENAI={SK}"]}, ["setup[0]"], id="openai-shape"),
    pytest.param({"x": {"y": AWS}}, ["x.y"], id="aws-shape"),
    pytest.param({"hook": SLACK}, ["hook"], id="slack-shape"),
    pytest.param({"cert": PEM}, ["cert"], id="pem-shape"),
    pytest.param([{"ok": "fine"}, {"t": HF}], ["[1].t"], id="top-level-list"),
    pytest.param({HF: 1}, [HIDDEN], id="token-as-key-hidden-in-path"),
    pytest.param({"name": "hf_short", "task": "task-" + "a" * 30, "path": "/data/sk-model"}, [], id="near-misses"),
]


@pytest.mark.parametrize("data, expected", SECRET_ROWS)
def test_secret_paths(data, expected):
    found = secret_paths(data)
    assert found == expected
    for path in found:  # a refused value never shows, neither in the path nor where it is quoted
        for secret in ("s3cr3t-value", HF, GHP, GHPAT, SK, AWS, SLACK, "MIIEpAIBAAKCAQEA", "p1", "123456"):
            assert secret not in path
    if expected and isinstance(data, dict):
        value = _at(data, expected[0])
        if value is not None:
            assert safe_quote(expected[0], value) == HIDDEN


def _at(data, path):
    import re
    node = data
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        if index:
            node = node[int(index)]
        elif name in node:
            node = node[name]
        else:
            return None
    return node


@pytest.mark.parametrize("secret", [HF, GHP, GHPAT, SK, AWS, SLACK, PEM], ids=["hf", "ghp", "ghpat", "sk", "aws", "slack", "pem"])
def test_redact_and_safe_quote_never_show_token_shapes(secret):
    for value in (secret, f"prefix {secret} suffix", [secret], {"k": secret}):
        assert secret.strip() not in redact(value) and HIDDEN in redact(value)
        assert safe_quote("description", value) == HIDDEN
    assert "MIIEpAIBAAKCAQEA" not in redact(PEM) + safe_quote("x", PEM)


@pytest.mark.parametrize("path, value, expected", [
    ("env.hfToken", "s3cr3t-value", HIDDEN),
    ("db.password", 123456, HIDDEN),
    ("auth.x[0]", "s3cr3t-value", HIDDEN),
    ("api.key", "abc", HIDDEN),
    ("train.steps", "ten", "ten"),
    ("model.tokenizer", "/data/tok", "/data/tok"),
    ("name", "a\x1b[31mb\nc\u202e", "a\\x1b[31mb\\nc\\u202e"),
    ("name", "x" * 100, "x" * 59 + "…"),
    ("resources", {"nodes": 2}, "{'nodes': 2}"),
])
def test_safe_quote(path, value, expected):
    assert safe_quote(path, value) == expected


def test_redact_limit():
    assert redact("y" * 10, limit=5) == "yyyy…" and redact("short") == "short"
    assert len(redact("\x00" * 100)) <= 60 and "\x00" not in redact("\x00" * 100)
