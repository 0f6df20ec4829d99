"""nvmeta.neurovault against the fixture server (and in-memory pages): retries, pagination, safety, files."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import requests
from conftest import N_MANY, fast_config, md5

from nvmeta.errors import ConfigError
from nvmeta.neurovault import (
    BaseClient,
    CorruptFile,
    Forbidden,
    HTTPClient,
    NeuroVaultError,
    NotFound,
    NotJSON,
    OfflineError,
    ServerError,
    SnapshotClient,
    TooLarge,
    UnsafeInput,
    canonical_url,
    check_image_id,
    make_client,
)
from nvmeta.testing.server import FixtureServer
from nvmeta.workflow.config import defaults


@pytest.fixture
def out(tmp_path):
    """An empty output directory (tmp_path itself holds the snapshot)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def leftovers(d: Path, keep=()) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------------------------
# construction, ids, URLs
# ------------------------------------------------------------------------------------------------
def test_make_client_kinds(tiny_snapshot, out):
    c = make_client({**defaults("neurovault"), "url": "https://neurovault.org/api/"})
    assert isinstance(c, HTTPClient) and c.base == "https://neurovault.org/api/"
    assert c.timeout == (30.0, 30.0) and c.mode == "download_new" and not c.offline
    assert (
        make_client({**defaults("neurovault"), "url": "http://neurovault.org/api"}).base
        == "https://neurovault.org/api/"
    )
    assert make_client(
        {**defaults("neurovault"), "url": "https://neurovault.org/api/", "timeout": [3, 60]}
    ).timeout == (3.0, 60.0)
    assert make_client(
        {**defaults("neurovault"), "url": "https://neurovault.org/api/", "mode": "offline"}
    ).offline
    s = make_client({**defaults("neurovault"), "url": str(tiny_snapshot.root)})
    assert isinstance(s, SnapshotClient)
    with pytest.raises(ConfigError, match="neurovault.url"):
        make_client({**defaults("neurovault"), "url": str(out / "missing")})
    with pytest.raises(ConfigError, match="neurovault.url"):
        make_client({**defaults("neurovault"), "url": "ftp://neurovault.org/api/"})
    with pytest.raises(ConfigError, match="neurovault.mode"):
        make_client({**defaults("neurovault"), "url": "https://neurovault.org/api/", "mode": "sometimes"})


@pytest.mark.parametrize("good,expected", [(1, 1), ("151", 151), (396069, 396069)])
def test_check_image_id_ok(good, expected):
    assert check_image_id(good) == expected


@pytest.mark.parametrize(
    "bad", [0, -3, "0", "-3", "+3", " 3", "3.0", 3.0, True, None, "1e3", "../1", "١٢", "9" * 20]
)
def test_check_image_id_rejects(bad):
    with pytest.raises(UnsafeInput, match="invalid id"):
        check_image_id(bad)


def test_canonical_url():
    assert (
        canonical_url("http://neurovault.org/media/images/1/a.nii.gz")
        == "https://neurovault.org/media/images/1/a.nii.gz"
    )
    assert (
        canonical_url("http://www.neurovault.org/api/?limit=1") == "https://www.neurovault.org/api/?limit=1"
    )
    assert canonical_url("http://127.0.0.1:80/x") == "http://127.0.0.1:80/x"
    assert canonical_url("http://neurovault.org:8080/x") == "http://neurovault.org:8080/x"


def test_api_path_validation(client):
    assert client.api_url("images/1") == client.base + "images/1/"
    for bad in ("/etc/passwd", "images/../../x", "http://evil/", "images/1/?limit=1", "images\\1"):
        with pytest.raises(UnsafeInput):
            client.api_url(bad)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("file:///etc/passwd", "not http"),
        ("../../etc/passwd", "not http"),
        ("/media/images/11/zstat1.nii.gz", "not http"),
        ("ftp://{host}/media/x.nii.gz", "not http"),
        ("http://evil.example.org/media/images/11/zstat1.nii.gz", "foreign host"),
        ("https://neurovault.org/media/images/11/zstat1.nii.gz", "foreign host"),  # not the configured host
        ("http://{host}/media/images/11/../../../etc/passwd", "traversal"),
        ("http://{host}/media/images/11/%2e%2e/%2E%2E/x.nii.gz", "traversal"),
        ("http://user:pw@{host}/media/images/11/zstat1.nii.gz", "credentials"),
        ("http://{host}/media/images/11/a\nb.nii.gz", "control"),
        ("", "no file URL"),
        (None, "no file URL"),
    ],
)
def test_unsafe_file_urls_refused_without_request(fixture_server, client, out, bad, match):
    host = fixture_server.base.split("//")[1]
    url = bad.replace("{host}", host) if isinstance(bad, str) else bad
    with pytest.raises(UnsafeInput, match=match):
        client.download(url, out / "map.nii.gz")
    assert fixture_server.requests == []
    assert leftovers(out) == []


def test_neurovault_http_file_url_allowed_when_configured_on_neurovault():
    c = make_client({**defaults("neurovault"), "url": "https://neurovault.org/api/"})
    assert (
        c.check_file_url("http://neurovault.org/media/images/1/a.nii.gz")
        == "https://neurovault.org/media/images/1/a.nii.gz"
    )
    with pytest.raises(UnsafeInput):
        c.check_file_url("https://neurovault.org.evil.com/media/images/1/a.nii.gz")


# ------------------------------------------------------------------------------------------------
# JSON requests
# ------------------------------------------------------------------------------------------------
def test_get_json_trailing_slash_and_user_agent(fixture_server, client):
    rec = client.image(101)
    assert rec["id"] == 101 and rec["file"].startswith(fixture_server.base)
    assert client.get_json("collections/11")["id"] == 11
    assert fixture_server.requests == ["/api/images/101/", "/api/collections/11/"]  # no 301 needed
    assert {e["user_agent"] for e in fixture_server.log} == {"nvmeta-tests"}
    assert (
        "nvmeta/"
        in make_client({**defaults("neurovault"), "url": "https://neurovault.org/api/"}).session.headers[
            "User-Agent"
        ]
    )


def test_not_found_forbidden(fixture_server, client):
    with pytest.raises(NotFound, match="404"):
        client.image(999)
    with pytest.raises(NotFound):
        client.image(201)  # image of a private collection: 404 like the real server
    with pytest.raises(Forbidden, match="403"):
        client.collection(12)


def test_follows_trailing_slash_redirect(fixture_server, client):
    # a server-side redirect (e.g. a path without slash reached through a link) is followed
    fixture_server.add_fault(r"^/api/images/101/$", "redirect", times=1, location="{base}/api/images/101")
    assert client.image(101)["id"] == 101
    assert fixture_server.requests == ["/api/images/101/", "/api/images/101", "/api/images/101/"]


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_5xx_then_success(fixture_server, client, code):
    fixture_server.add_fault("images/101", "status", times=2, code=code)
    assert client.image(101)["id"] == 101
    assert fixture_server.count("images/101") == 3


def test_5xx_exhausted(fixture_server, client):
    fixture_server.add_fault("images/101", "status", code=503)
    with pytest.raises(ServerError, match="503"):
        client.image(101)
    assert fixture_server.count("images/101") == 1 + client.retries


def test_429_retry_after_honoured(fixture_server, client):
    fixture_server.add_fault("images/101", "retry_after", times=1, seconds=1)
    assert client.image(101)["id"] == 101
    t = [e["t"] for e in fixture_server.log]
    assert len(t) == 2 and t[1] - t[0] >= 0.9  # waited Retry-After, not the tiny backoff


def test_stall_timeout_then_success(tiny_snapshot):
    with FixtureServer(tiny_snapshot.root) as srv:
        c = make_client(fast_config(srv.url, timeout=[1.0, 0.3]))
        srv.add_fault("images/101", "stall", times=1, seconds=2)
        assert c.image(101)["id"] == 101
        srv.add_fault("images/102", "stall", seconds=2)
        with pytest.raises(ServerError, match="timed out"):
            c.image(102)
        assert srv.count("images/102") == 1 + c.retries


def test_connection_dropped(fixture_server, client):
    fixture_server.add_fault("images/101", "down", times=2)
    assert client.image(101)["id"] == 101
    fixture_server.add_fault("images/102", "down")
    with pytest.raises(ServerError, match="connection"):
        client.image(102)
    fixture_server.add_fault("images/103", "down", mode="503")
    with pytest.raises(ServerError, match="503"):
        client.image(103)


def test_server_not_listening(tiny_snapshot):
    srv = FixtureServer(tiny_snapshot.root)
    url = srv.url
    srv.stop()  # port closed: connection refused
    with pytest.raises(ServerError, match="connection"):
        make_client(fast_config(url, retries=1)).image(101)


def test_html_instead_of_json(fixture_server, client):
    fixture_server.add_fault("images/101", "html200")
    with pytest.raises(NotJSON, match="server returned HTML instead of JSON"):
        client.image(101)


def test_redirect_loop(fixture_server, client):
    fixture_server.add_fault("images/101", "redirect_loop")
    with pytest.raises(ServerError, match="too many redirects"):
        client.image(101)
    assert fixture_server.count("images/101") == 11  # bounded (max_redirects 10)


@pytest.mark.parametrize("kind", ["truncate", "reset"])
def test_json_cut_short_then_success(fixture_server, client, kind):
    fixture_server.add_fault("images/101", kind, times=1)
    assert client.image(101)["id"] == 101
    fixture_server.add_fault("images/102", kind)
    with pytest.raises(ServerError, match="cut short"):
        client.image(102)
    assert fixture_server.count("images/102") == client.download_attempts


def test_json_too_large(fixture_server):
    c = make_client(fast_config(fixture_server.url, max_json_bytes=500))
    with pytest.raises(TooLarge, match="JSON reply too large"):
        c.image(101)


def test_get_json_url_neurosynth(fixture_server, client):
    reply = client.get_json_url(fixture_server.base + "/api/decode/", params={"neurovault": 101})
    assert reply["data"]["values"]["pain"] == 0.31
    assert fixture_server.requests == ["/api/decode/?neurovault=101"]
    with pytest.raises(NotFound):
        client.get_json_url(fixture_server.base + "/api/decode/", params={"neurovault": 102})
    with pytest.raises(UnsafeInput):
        client.get_json_url("file:///etc/passwd")


def test_offline_makes_no_request(fixture_server, out):
    c = make_client(fast_config(fixture_server.url, mode="offline"))
    for call in (
        lambda: c.image(101),
        lambda: list(c.iter_results("images/")),
        lambda: c.get_json_url(fixture_server.base + "/api/decode/", {"neurovault": 101}),
        lambda: c.download(
            fixture_server.tiny.records[101]["file"].replace("https://neurovault.org", fixture_server.base),
            out / "m.nii.gz",
        ),
    ):
        with pytest.raises(OfflineError, match="offline"):
            call()
    assert fixture_server.requests == []
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------------
# pagination
# ------------------------------------------------------------------------------------------------
def test_iter_results_all_pages(fixture_server, client, caplog):
    with caplog.at_level(logging.INFO, logger="nvmeta"):
        ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=7)]
    lines = [r.getMessage() for r in caplog.records]
    assert ids == fixture_server.tiny.ids["many"]
    assert fixture_server.requests == [
        "/api/collections/13/images/?limit=7&offset=0",
        "/api/collections/13/images/?limit=7&offset=7",
        "/api/collections/13/images/?limit=7&offset=14",
        "/api/collections/13/images/?limit=7&offset=21",
    ]
    assert client.last_listing["complete"] and client.last_listing["pages"] == 4
    assert any("25/25" in line for line in lines)


def test_iter_results_limit_capped(fixture_server, client):
    ids = [r["id"] for r in client.iter_results("images/", limit=5000)]
    assert fixture_server.requests == ["/api/images/?limit=1000&offset=0"]
    assert len(ids) == len(set(ids)) == len(fixture_server.tiny.records) - 1  # private one not listed


def test_iter_results_big_listing_cap(out):
    """A listing above the server's cap of 1000 per page: two pages, nothing lost."""
    from nvmeta.neurovault.layout import write_snapshot

    recs = [{"id": i, "collection_id": 1} for i in range(1, 1004)]
    write_snapshot(out / "big", recs, [{"id": 1}])
    with FixtureServer(out / "big") as srv:
        c = make_client(fast_config(srv.url))
        ids = [r["id"] for r in c.iter_results("images/", limit=10_000)]
        assert ids == list(range(1, 1004))
        assert srv.requests == ["/api/images/?limit=1000&offset=0", "/api/images/?limit=1000&offset=1000"]
    s = make_client({**defaults("neurovault"), "url": str(out / "big")})
    assert [r["id"] for r in s.iter_results("images/", limit=10_000)] == list(range(1, 1004))
    assert s.last_listing["pages"] == 2


def test_iter_results_duplicates_across_pages(fixture_server, client, caplog):
    fixture_server.add_fault(r"offset=(10|20)", "duplicate")  # prepend: pages longer than limit
    with caplog.at_level(logging.WARNING, logger="nvmeta.neurovault"):
        ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=10)]
    assert ids == fixture_server.tiny.ids["many"]  # deduplicated, nothing skipped
    assert client.last_listing["duplicates"] == 2 and client.last_listing["complete"]
    assert "duplicate" in caplog.text


def test_iter_results_duplicate_replacing_an_item_warns(fixture_server, client, caplog):
    fixture_server.add_fault(r"offset=10", "duplicate", mode="replace")  # unstable order: one item lost
    with caplog.at_level(logging.WARNING, logger="nvmeta.neurovault"):
        ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=10)]
    assert len(ids) == len(set(ids)) == N_MANY - 1
    assert not client.last_listing["complete"]
    assert "listing incomplete: 24 of 25" in caplog.text
    fixture_server.reset_log()
    with pytest.raises(NeuroVaultError, match="listing incomplete"):
        list(client.iter_results("collections/13/images/", limit=10, strict=True))


def test_iter_results_empty_page_once_recovers(fixture_server, client):
    fixture_server.add_fault(r"offset=10", "empty_page", times=1)
    ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=10)]
    assert ids == fixture_server.tiny.ids["many"]
    assert fixture_server.count("offset=10") == 2  # asked again once


def test_iter_results_empty_page_forever_stops(fixture_server, client, caplog):
    fixture_server.add_fault(r"offset=10", "empty_page")
    with caplog.at_level(logging.INFO, logger="nvmeta"):
        ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=10)]
    lines = [f"{r.levelname}: {r.getMessage()}" for r in caplog.records]
    assert ids == fixture_server.tiny.ids["many"][:10]
    assert fixture_server.count("offset=10") == 2 and len(fixture_server.requests) == 3
    assert client.last_listing["stop_reason"] == "empty page at 10/25"
    assert any(line.startswith("WARNING") and "listing incomplete: 10 of 25" in line for line in lines)


def test_iter_results_listing_html_and_5xx(fixture_server, client):
    fixture_server.add_fault(r"offset=10", "status", times=1, code=502)
    assert len(list(client.iter_results("collections/13/images/", limit=10))) == N_MANY
    fixture_server.add_fault(r"offset=20", "html200")
    with pytest.raises(NotJSON, match="HTML"):
        list(client.iter_results("collections/13/images/", limit=10))


def test_iter_results_private_collection(client):
    with pytest.raises(Forbidden):
        list(client.collection_images(12))


class PagesClient(BaseClient):
    """In-memory pages keyed by URL, to test link validation without a server."""

    def __init__(self, pages):
        super().__init__()
        self.base = "https://neurovault.org/api/"
        self.pages = pages
        self.fetched = []

    def _allowed_netlocs(self):
        return {"neurovault.org"}

    def _fetch_json(self, url, params):
        from urllib.parse import urlencode

        key = url + ("?" + urlencode(params) if params else "")
        self.fetched.append(key)
        return self.pages[key]


def test_next_link_validation_and_rewrites():
    b = "https://neurovault.org/api/images/"
    pages = {
        b + "?limit=2&offset=0": {
            "count": 6,
            "next": "http://neurovault.org/api/images/?limit=2&offset=2/",
            "results": [{"id": 1}, {"id": 2}],
        },
        # http -> https, junk after the query (NeuroVault #547) cleaned
        b + "?limit=2&offset=2": {
            "count": 6,
            "next": b + "?limit=2&offset=4",
            "results": [{"id": 3}, {"id": 4}],
        },
        b + "?limit=2&offset=4": {"count": 6, "next": None, "results": [{"id": 5}, {"id": 6}]},
    }
    c = PagesClient(pages)
    assert [r["id"] for r in c.iter_results("images/", limit=2)] == [1, 2, 3, 4, 5, 6]
    assert c.fetched[1] == b + "?limit=2&offset=2"

    evil = {
        b + "?limit=2&offset=0": {
            "count": 6,
            "next": "https://evil.org/api/images/?offset=2",
            "results": [{"id": 1}, {"id": 2}],
        }
    }
    with pytest.raises(UnsafeInput, match="another host"):
        list(PagesClient(evil).iter_results("images/", limit=2))
    other = {
        b + "?limit=2&offset=0": {
            "count": 6,
            "next": "https://neurovault.org/api/users/?offset=2",
            "results": [{"id": 1}, {"id": 2}],
        }
    }
    with pytest.raises(UnsafeInput, match="another path"):
        list(PagesClient(other).iter_results("images/", limit=2))


def test_next_link_loop_and_max_pages_bounded():
    b = "https://neurovault.org/api/images/"
    loop = {
        b + "?limit=2&offset=0": {
            "count": 6,
            "next": b + "?limit=2&offset=2",
            "results": [{"id": 1}, {"id": 2}],
        },
        b + "?limit=2&offset=2": {
            "count": 6,
            "next": b + "?limit=2&offset=0",
            "results": [{"id": 3}, {"id": 4}],
        },
    }
    c = PagesClient(loop)
    assert [r["id"] for r in c.iter_results("images/", limit=2)] == [1, 2, 3, 4]
    assert c.last_listing["stop_reason"] == "pagination link repeats a page already fetched"
    assert len(c.fetched) == 2
    c = PagesClient(loop)
    list(c.iter_results("images/", limit=2, max_pages=1))
    assert len(c.fetched) == 1 and "max_pages" in c.last_listing["stop_reason"]


# ------------------------------------------------------------------------------------------------
# http -> https rewriting, end to end without network: https://neurovault.org is forwarded to the
# fixture server by a transport adapter; anything else (plain http) is refused.
# ------------------------------------------------------------------------------------------------
class ForwardAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, target_base, seen):
        super().__init__()
        self.target, self.seen = target_base, seen

    def send(self, request, **kw):
        self.seen.append(request.url)
        request.url = request.url.replace("https://neurovault.org", self.target)
        return super().send(request, **kw)


class RefuseAdapter(requests.adapters.BaseAdapter):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def send(self, request, **kw):
        self.seen.append(request.url)
        raise requests.exceptions.ConnectionError("refused by test: plain http")

    def close(self):
        pass


def test_http_links_rewritten_to_https(tiny_snapshot, out):
    with FixtureServer(tiny_snapshot.root, public_base="http://neurovault.org") as srv:
        c = make_client(fast_config("https://neurovault.org/api/", retries=0))
        https_seen, http_seen = [], []
        c.session.mount("https://neurovault.org", ForwardAdapter(srv.base, https_seen))
        c.session.mount("http://", RefuseAdapter(http_seen))
        c.session.mount("https://", RefuseAdapter(http_seen))
        c.session.mount("https://neurovault.org", ForwardAdapter(srv.base, https_seen))
        rec = c.image(101)
        assert rec["file"] == "http://neurovault.org/media/images/11/zstat1.nii.gz"  # served as http
        ids = [r["id"] for r in c.iter_results("collections/13/images/", limit=10)]
        assert ids == tiny_snapshot.ids["many"]
        info = c.download(rec["file"], out / "map.nii.gz")
        assert info["source_url"] == "https://neurovault.org/media/images/11/zstat1.nii.gz"
        assert info["md5"] == md5(tiny_snapshot.served[101])
        assert http_seen == [] and all(u.startswith("https://neurovault.org/") for u in https_seen)
        assert len(https_seen) == 5


# ------------------------------------------------------------------------------------------------
# downloads
# ------------------------------------------------------------------------------------------------
def file_url(srv, iid):
    return srv.tiny.records[iid]["file"].replace("https://neurovault.org", srv.base)


def test_download_niigz_byte_identical(fixture_server, client, out):
    dest = out / "map.nii.gz"
    info = client.download(
        file_url(fixture_server, 101), dest, expected_size=len(fixture_server.tiny.served[101])
    )
    served = fixture_server.tiny.served[101]
    assert dest.read_bytes() == served
    assert info["md5"] == info["map_md5"] == md5(served) and info["bytes"] == len(served)
    assert info["source_format"] == "nii.gz"
    assert leftovers(out) == ["map.nii.gz"]


def test_download_nii_stored_gzipped(fixture_server, client, out):
    dest = out / "map.nii.gz"
    info = client.download(file_url(fixture_server, 103), dest)
    served = fixture_server.tiny.served[103]
    assert gzip.decompress(dest.read_bytes()) == served
    assert (
        info["md5"] == md5(served)
        and info["source_format"] == "nii"
        and info["map_md5"] == md5(dest.read_bytes())
    )
    assert leftovers(out) == ["map.nii.gz"]


def test_download_analyze_pair_converted(fixture_server, client, out):
    import nibabel as nib
    import numpy as np

    dest = out / "map.nii.gz"
    info = client.download(file_url(fixture_server, 104), dest)
    assert info["source_format"] == "analyze" and info["md5"] == md5(fixture_server.tiny.served[104])
    img = nib.load(dest)
    assert isinstance(img, nib.Nifti1Image)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), fixture_server.tiny.analyze_data)
    assert fixture_server.requests == ["/media/images/11/spm_T.hdr", "/media/images/11/spm_T.img"]
    assert leftovers(out) == ["map.nii.gz"]


def test_download_truncated_file_refused(fixture_server, client, out):
    dest = out / "map.nii.gz"
    with pytest.raises(CorruptFile, match="corrupt gzip"):
        client.download(file_url(fixture_server, 106), dest)
    assert fixture_server.count("truncated") == 2  # fetched once more, same md5 -> the file is bad
    assert leftovers(out) == []


@pytest.mark.parametrize("kind", ["truncate", "reset"])
def test_download_cut_short_recovers(fixture_server, client, out, kind):
    fixture_server.add_fault("zstat1", kind, times=2)
    dest = out / "map.nii.gz"
    info = client.download(file_url(fixture_server, 101), dest)
    assert dest.read_bytes() == fixture_server.tiny.served[101] and info["md5"] == md5(dest.read_bytes())
    assert fixture_server.count("zstat1") == 3
    assert leftovers(out) == ["map.nii.gz"]


@pytest.mark.parametrize("kind", ["truncate", "reset"])
def test_download_cut_short_always_fails(fixture_server, client, out, kind):
    fixture_server.add_fault("zstat1", kind)
    with pytest.raises(CorruptFile, match="download incomplete after 3 attempts"):
        client.download(file_url(fixture_server, 101), out / "map.nii.gz")
    assert leftovers(out) == []


def test_download_not_nifti(fixture_server, client, out):
    fixture_server.add_fault("zstat1", "not_nifti")
    with pytest.raises(CorruptFile, match="not a NIfTI image"):
        client.download(file_url(fixture_server, 101), out / "map.nii.gz")
    assert leftovers(out) == []


def test_download_html200_then_success(fixture_server, client, out):
    fixture_server.add_fault("zstat1", "html200", times=1)
    client.download(file_url(fixture_server, 101), out / "map.nii.gz")
    assert (out / "map.nii.gz").read_bytes() == fixture_server.tiny.served[101]
    fixture_server.add_fault("tstat1", "html200")
    with pytest.raises(CorruptFile, match="server returned HTML instead of a NIfTI file"):
        client.download(file_url(fixture_server, 102), out / "map2.nii.gz")
    assert leftovers(out) == ["map.nii.gz"]


def test_download_too_large(fixture_server, out):
    served = fixture_server.tiny.served[101]
    c = make_client(fast_config(fixture_server.url, max_file_bytes=len(served) - 1))
    with pytest.raises(TooLarge, match="declared"):
        c.download(file_url(fixture_server, 101), out / "map.nii.gz")  # Content-Length
    with pytest.raises(TooLarge, match="file_size"):
        c.download(file_url(fixture_server, 101), out / "map.nii.gz", expected_size=len(served))
    assert fixture_server.count("zstat1") == 1  # the second was refused before any request
    assert leftovers(out) == []


def test_download_too_large_without_content_length(fixture_server, out, monkeypatch):
    """Actual size is bounded even when no length is declared (streamed count)."""
    served = fixture_server.tiny.served[101]
    c = make_client(fast_config(fixture_server.url, max_file_bytes=len(served) // 2))
    orig = requests.Session.get

    def get(self, *a, **kw):
        r = orig(self, *a, **kw)
        r.headers.pop("Content-Length", None)
        return r

    monkeypatch.setattr(requests.Session, "get", get)
    with pytest.raises(TooLarge, match="more than max_file_bytes"):
        c.download(file_url(fixture_server, 101), out / "map.nii.gz")
    assert leftovers(out) == []


def test_download_404_403(fixture_server, client, out):
    with pytest.raises(NotFound):
        client.download(f"{fixture_server.base}/media/images/11/gone.nii.gz", out / "m.nii.gz")
    with pytest.raises(Forbidden):
        client.download(f"{fixture_server.base}/media/images/12/secret.nii.gz", out / "m.nii.gz")
    with pytest.raises(CorruptFile, match="not a NIfTI file name"):
        client.download(f"{fixture_server.base}/media/images/11/x.mgz", out / "m.nii.gz")
    assert leftovers(out) == []


def test_download_5xx_then_success(fixture_server, client, out):
    fixture_server.add_fault("zstat1", "status", times=2, code=502)
    fixture_server.add_fault("tstat1", "retry_after", times=1, seconds=0)
    client.download(file_url(fixture_server, 101), out / "a.nii.gz")
    client.download(file_url(fixture_server, 102), out / "b.nii.gz")
    assert (out / "a.nii.gz").read_bytes() == fixture_server.tiny.served[101]
    assert (out / "b.nii.gz").read_bytes() == fixture_server.tiny.served[102]


# ------------------------------------------------------------------------------------------------
# snapshot client: same interface, same answers, no network
# ------------------------------------------------------------------------------------------------
def test_snapshot_client_matches_http(fixture_server, client, out):
    s = make_client({**defaults("neurovault"), "url": str(fixture_server.tiny.root)})
    for path in ("images/", "collections/", "collections/13/images/"):
        a = list(s.iter_results(path, limit=4))
        b = list(client.iter_results(path, limit=4))
        fix = [json.loads(json.dumps(r).replace(fixture_server.base, "https://neurovault.org")) for r in b]
        assert a == fix
    assert s.image(101) == fixture_server.tiny.records[101]
    with pytest.raises(NotFound):
        s.image(201)
    with pytest.raises(Forbidden):
        s.collection(12)
    with pytest.raises(NotFound):
        s.image(999)
    info = s.download(fixture_server.tiny.records[101]["file"], out / "m.nii.gz")
    assert info["md5"] == md5(fixture_server.tiny.served[101])
    info = s.download(fixture_server.tiny.records[104]["file"], out / "a.nii.gz")
    assert info["source_format"] == "analyze"
    with pytest.raises(CorruptFile):
        s.download(fixture_server.tiny.records[106]["file"], out / "t.nii.gz")
    with pytest.raises(Forbidden):
        s.download(fixture_server.tiny.records[201]["file"], out / "p.nii.gz")
    with pytest.raises(UnsafeInput):
        s.download("https://evil.org/media/images/11/zstat1.nii.gz", out / "p.nii.gz")
    assert (
        s.get_json_url("https://neurosynth.org/api/decode/", {"neurovault": 101})["data"]["values"]["pain"]
        == 0.31
    )
    with pytest.raises(NotFound):
        s.get_json_url("https://neurosynth.org/api/decode/", {"neurovault": 102})
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "m.nii.gz"]
    assert fixture_server.requests and all(
        "limit=4" in p for p in fixture_server.requests
    )  # only the HTTP client's


def test_nan_in_json_read_as_null(tmp_path):
    from nvmeta.neurovault.layout import write_snapshot

    write_snapshot(tmp_path / "n", [{"id": 5, "collection_id": 1}], [{"id": 1}])
    (tmp_path / "n/api/images/5.json").write_text('{"id": 5, "collection_id": 1, "perc_bad_voxels": NaN}')
    with FixtureServer(tmp_path / "n") as srv:
        assert make_client(fast_config(srv.url)).image(5)["perc_bad_voxels"] is None


def test_under_reported_count_listing_followed_to_the_end(fixture_server, client, caplog):
    """A count below the items behind the next links: every item is yielded, with a warning."""
    fixture_server.add_fault(r"collections/13/images/", "miscount", count=3)
    with caplog.at_level(logging.WARNING, logger="nvmeta"):
        ids = [r["id"] for r in client.iter_results("collections/13/images/", limit=7)]
    assert ids == fixture_server.tiny.ids["many"]
    assert fixture_server.count("collections/13/images/") == 4
    assert "count (3) under-reports its items: 25 records" in caplog.text


def test_client_settings_come_from_the_schema():
    """No defaults dict in the client: every setting comes from the block, built from the schema's defaults."""
    import nvmeta.neurovault

    assert not hasattr(nvmeta.neurovault, "DEFAULTS")
    d = defaults("neurovault")
    c = make_client({**defaults("neurovault"), "url": "https://neurovault.org/api/"})
    assert (c.backoff, c.max_json_bytes, c.max_file_bytes, c.retries) == (
        d["backoff"],
        d["max_json_bytes"],
        d["max_file_bytes"],
        d["retries"],
    )
    assert c.session.headers["User-Agent"] == d["user_agent"]
    assert c.download_attempts == d["download_attempts"] == 3
    assert make_client({**d, "download_attempts": 5}).download_attempts == 5


def test_shared_retry_helper(caplog):
    """The one re-attempt loop: bounded, gives up with the caller's error, stops early on request."""
    from nvmeta.neurovault.retry import retry

    log = logging.getLogger("nvmeta.test_retry")
    calls = []

    def flaky(attempt):
        calls.append(attempt)
        if attempt < 3:
            raise OSError(f"cut {attempt}")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="nvmeta.test_retry"):
        assert retry(flaky, attempts=3, retry_on=OSError, what="x", again="asking again", log=log) == "ok"
    assert calls == [1, 2, 3] and caplog.text.count("asking again") == 2
    calls.clear()
    with pytest.raises(ServerError, match="gave up after 2"):
        retry(
            flaky,
            attempts=2,
            retry_on=OSError,
            what="x",
            again="again",
            log=log,
            give_up=lambda e, n: ServerError(f"gave up after {n} ({e})"),
        )
    assert calls == [1, 2]
    calls.clear()
    with pytest.raises(OSError, match="cut 1"):
        retry(flaky, attempts=5, retry_on=OSError, what="x", again="again", log=log, stop=lambda e: True)
    assert calls == [1]
    with pytest.raises(KeyError):  # not retried
        retry(lambda a: {}["k"], attempts=5, retry_on=OSError, what="x", again="again", log=log)


def test_a_number_too_large_for_a_float_is_kept_as_written(tmp_path):
    """``"number_of_subjects": 1e400`` in a reply parsed to inf: the query's JSON outputs (written
    with allow_nan=False) then crashed the job. It is kept as the text it was sent as, and the
    per-image stage names it."""
    from nvmeta.images.stats import resolve_sample_size
    from nvmeta.io import write_json
    from nvmeta.neurovault.layout import write_snapshot

    record = {"id": 7, "collection_id": 3, "map_type": "T map", "number_of_subjects": 25, "file": None}
    root = write_snapshot(tmp_path / "snap", [record], [{"id": 3, "name": "c"}])
    path = root / "api" / "images" / "7.json"
    path.write_text(path.read_text().replace('"number_of_subjects": 25', '"number_of_subjects": 1e400'))
    with FixtureServer(root) as srv:
        for client in (
            make_client({**defaults("neurovault"), "url": str(root)}),
            make_client({**defaults("neurovault"), "url": srv.url, "retries": 0}),
        ):
            got = client.image(7)
            assert got["number_of_subjects"] == "1e400"
            write_json(tmp_path / "record.json", got)  # no ValueError: Out of range float values
            size = resolve_sample_size(
                got, {**defaults("conversion"), "df": "n-1"}, max_n=100_000, need_df=True
            )
            assert size.n is None and "'1e400' is not finite" in size.reason
