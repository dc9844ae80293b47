"""Generalization tooling: vocoded spoof data, the frozen encoders (offline), LOSO folds."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from models.data.asvspoof import ASVspoofSplit, read_protocol
from models.data.audio import load_audio
from models.tasks.antispoofing import training_items
from models.tasks.config import TrainConfig
from models.tasks.loso import FoldScores, fold_eval_trials, report
from tests.paths import CORPUS, require

WHISPER_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: weights load from the
    installed packages only."""

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _two_bonafide(tmp_path: Path) -> tuple[Path, Path]:
    """A protocol with one digit and one sentence of the corpus' bona fide train audio."""
    split = ASVspoofSplit(require(CORPUS), "train")
    bona = [t for t in split.trials() if t.is_bonafide]
    digit = next(t for t in bona if t.speaker.startswith("FS_"))
    sentence = next(t for t in bona if t.speaker.startswith("LS_"))
    spoof = next(t for t in split.trials() if not t.is_bonafide)
    protocol = tmp_path / "protocol.txt"
    protocol.write_text("".join(
        f"{t.speaker} {t.utt_id} - {t.system} {'bonafide' if t.is_bonafide else 'spoof'}\n"
        for t in (digit, spoof, sentence)))
    return protocol, split.audio_dir


def test_vocoding_a_real_clip(tmp_path: Path, no_network: None, one_thread: None) -> None:
    from models.data.vocode import vocode

    protocol, audio_dir = _two_bonafide(tmp_path)
    from models.data.vocode import sources_from_protocol

    sources = sources_from_protocol(protocol, audio_dir)
    assert len(sources) == 2  # the spoof line is not vocoded
    first = vocode(sources, tmp_path / "a", ["hifigan-universal", "hifigan-lj"])
    again = vocode(sources, tmp_path / "b", ["hifigan-universal", "hifigan-lj"])
    lines = first.read_text().splitlines()
    assert lines == again.read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["V01", "V01", "V02", "V02"]
    trials = read_protocol(first)  # the protocol parses as an ASVspoof one: spoof lines
    assert all(not t.is_bonafide for t in trials)
    for source, trial in zip(sources * 2, trials, strict=True):
        assert trial.speaker == source.speaker and trial.utt_id.startswith(source.utt_id)
        out, rate = sf.read(tmp_path / "a" / "flac" / f"{trial.utt_id}.flac", dtype="float32")
        twin, _ = sf.read(tmp_path / "b" / "flac" / f"{trial.utt_id}.flac", dtype="float32")
        original = load_audio(source.path, 8000)
        assert rate == 8000 and out.shape == original.shape
        np.testing.assert_array_equal(out, twin)  # deterministic
        # Same level as the source, but a different waveform whose spectrum follows it.
        level = np.sqrt(np.mean(out**2)) / np.sqrt(np.mean(original**2))
        assert 0.8 < level < 1.25
        assert not np.allclose(out, original, atol=1e-3)
        from scipy import signal

        spec = [np.log(np.abs(signal.stft(w, 8000, nperseg=256)[2]) + 1e-5).ravel()
                for w in (out, original)]
        assert np.corrcoef(*spec)[0, 1] > 0.7


def test_vocode_cli_resumes_and_rejects_bad_input(tmp_path: Path) -> None:
    from models.cli import main

    protocol, audio_dir = _two_bonafide(tmp_path)
    out = tmp_path / "v"
    assert main(["vocode", "--protocol", str(protocol), "--audio-dir", str(audio_dir),
                 "--out", str(out), "--limit", "1", "--threads", "1", "--quiet"]) == 0
    written = sorted((out / "flac").iterdir())
    assert len(written) == 1
    stamp = written[0].stat().st_mtime_ns
    assert main(["vocode", "--protocol", str(protocol), "--audio-dir", str(audio_dir),
                 "--out", str(out), "--limit", "1", "--quiet"]) == 0
    assert written[0].stat().st_mtime_ns == stamp  # kept, not redone
    assert main(["vocode", "--protocol", str(protocol), "--out", str(out)]) == 2
    assert main(["vocode", "--input-dir", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_whisper_encoder_loads_offline_from_its_package(no_network: None) -> None:
    from models.architectures.whisper import WhisperEncoder, whisper_model_dir

    model_bin = whisper_model_dir() / "model.bin"
    assert hashlib.sha256(model_bin.read_bytes()).hexdigest() == WHISPER_TINY_EN_SHA256
    encoder = WhisperEncoder(threads=1)
    assert not encoder.model.is_multilingual  # tiny.en
    split = ASVspoofSplit(require(CORPUS), "dev")
    wave = load_audio(split.audio_dir / f"{split.trials()[0].utt_id}.flac", 8000)
    window = np.resize(wave, 16000)[None]
    hidden = encoder.encode(window, 8000)
    assert hidden.shape == (1, 100, 384)  # 2 s at 16 kHz: 200 mel frames, stride 2
    emb = encoder.embed(np.concatenate([window, 0.5 * window]), 8000)
    assert emb.shape == (2, 768) and np.isfinite(emb).all()
    assert np.abs(emb[0] - emb[1]).max() > 1e-3  # level reaches the log-mel


def test_ge2e_encoder_loads_offline_from_its_package(no_network: None) -> None:
    from diarization.embedding import ResemblyzerEmbedding

    model = ResemblyzerEmbedding().eval()
    with torch.inference_mode():
        out = model(0.1 * torch.randn(1, 1, 32000))
    assert out.shape == (1, 256) and torch.isfinite(out).all()


def test_loso_fold_never_trains_on_the_held_out_engine(tmp_path: Path) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("LS_1 LA_T_X_V01 - V01 spoof\nLS_2 LA_T_Y_V01 - V01 spoof\n")
    config = TrainConfig.from_dict({
        "name": "t", "architecture": "rawnet2", "model": {},
        "data": {"root": str(require(CORPUS)), "exclude_systems": ["T04"],
                 "extra": [{"protocol": str(extra), "audio_dir": str(tmp_path)}]},
    })
    trials, dirs = training_items(config)
    systems = {t.system for t in trials}
    assert "T04" not in systems and {"-", "T01", "T06", "V01"} <= systems
    assert dirs[-1] == tmp_path and dirs[0] == ASVspoofSplit(CORPUS, "train").audio_dir
    corpus_count = len(ASVspoofSplit(CORPUS, "train").trials())
    assert len(trials) == corpus_count - 501 + 2
    dev = ASVspoofSplit(CORPUS, "dev").trials()
    test = fold_eval_trials(dev, "T04")
    assert {t.system for t in test} == {"-", "T04"}
    assert sum(t.is_bonafide for t in test) == sum(t.is_bonafide for t in dev)


def test_loso_report_pools_folds_and_counts_false_alarms() -> None:
    rng = np.random.default_rng(0)
    folds = []
    for system, shift in (("T01", 6.0), ("T02", 0.0)):  # T02 at chance
        bona, spoof = rng.normal(2, 1, 200), rng.normal(2 - shift, 1, 100)
        ids = [f"b{i}" for i in range(200)] + [f"{system}{i}" for i in range(100)]
        folds.append(FoldScores(system, ids, [1] * 200 + [0] * 100,
                                [*bona.tolist(), *spoof.tolist()]))
    durations = {f"b{i}": 0.5 if i < 100 else 3.0 for i in range(200)}
    result = report("synthetic", folds, durations, prior=0.5)
    assert result.per_engine["T01"] < 0.01 and 0.35 < result.per_engine["T02"] < 0.65
    assert result.per_engine["T01"] < result.pooled_eer < result.per_engine["T02"]
    assert result.misses["T01"] < 0.05 and result.misses["T02"] > 0.3
    assert set(result.false_alarms) == {"digits", "sentences", "all"}
    assert 0.0 <= result.false_alarms["digits"] <= 1.0


def test_fused_checkpoint_scores_as_its_weighted_parts(tmp_path: Path) -> None:
    from models.architectures.fusion import fusion_state
    from models.checkpoint import save_checkpoint
    from models.inference import NAMED_MODELS, load_detector

    parts = [torch.load(NAMED_MODELS[name], map_location="cpu", weights_only=True)
             for name in ("rawnet2-tel", "lfcc-gmm")]
    split = ASVspoofSplit(require(CORPUS), "dev")
    waves = [np.resize(load_audio(split.audio_dir / f"{t.utt_id}.flac", 8000), 32000)
             for t in split.trials()[:3]]
    singles = [load_detector(name).scores(waves) for name in ("rawnet2-tel", "lfcc-gmm")]
    for weight in ([1.0, 0.0], [0.0, 1.0], [0.5, -2.0]):
        path = tmp_path / "fused.pt"
        save_checkpoint(path, architecture="fusion", name="f", version="1", sample_rate=8000,
                        window_seconds=4.0, state_dict=fusion_state(parts, {
                            "mean": [1.0, -1.0], "scale": [2.0, 4.0], "weight": weight,
                            "bias": 0.25}))
        fused = load_detector(path)
        expected = (weight[0] * (singles[0] - 1.0) / 2.0 + weight[1] * (singles[1] + 1.0) / 4.0
                    + 0.25)
        np.testing.assert_allclose(fused.scores(waves), expected, rtol=1e-6, atol=1e-6)


def test_bona_normal_ranks_against_genuine_scores_and_extends_below_them() -> None:
    from scipy.stats import norm

    from models.architectures.fusion import bona_normal

    reference = np.arange(1.0, 100.0)  # 99 genuine scores, IQR 49
    z = bona_normal(np.array([50.0, 1.0, 99.0, 1000.0, 0.0, -49.0]), reference)
    assert z[0] == pytest.approx(norm.ppf(50.5 / 100))  # the median genuine score: ~0
    assert z[2] == pytest.approx(z[3])  # above every genuine score: no more genuine
    floor = norm.ppf(0.5 / 100)
    assert z[1] == pytest.approx(norm.ppf(1.5 / 100)) and z[1] > floor
    # below the lowest genuine score the quantile keeps falling, at the reference's spread
    assert z[4] == pytest.approx(floor - 1.0 / (49 / 1.349))
    assert z[5] == pytest.approx(floor - 50.0 / (49 / 1.349))
    scores = np.linspace(-200, 200, 401)
    assert np.all(np.diff(bona_normal(scores, reference)) >= 0)  # monotone: ranks kept


def test_bona_normal_fused_checkpoint_scores_as_its_ranked_parts(tmp_path: Path) -> None:
    from models.architectures.fusion import bona_normal, fusion_state
    from models.checkpoint import save_checkpoint
    from models.inference import NAMED_MODELS, detector_from_state, load_detector

    # the default's seed-0 LCNN part (it ships embedded only) and the LFCC+GMM baseline
    default = torch.load(NAMED_MODELS["default"], map_location="cpu", weights_only=True)
    lcnn = default["state_dict"]["parts"][default["model_config"]["parts"].index("lcnn")]
    parts = [lcnn, torch.load(NAMED_MODELS["lfcc-gmm"], map_location="cpu", weights_only=True)]
    split = ASVspoofSplit(require(CORPUS), "dev")
    waves = [np.resize(load_audio(split.audio_dir / f"{t.utt_id}.flac", 8000), 32000)
             for t in split.trials()[:4]]
    singles = [detector_from_state(lcnn).scores(waves), load_detector("lfcc-gmm").scores(waves)]
    reference = [np.linspace(-5, 5, 50), np.linspace(-1, 1, 30)]
    path = tmp_path / "fused.pt"
    save_checkpoint(path, architecture="fusion", name="f", version="1", sample_rate=8000,
                    window_seconds=4.0, state_dict=fusion_state(parts, {
                        "mean": [0.0, 0.0], "scale": [1.0, 1.0], "weight": [0.6, 0.4],
                        "bias": 0.5, "combine": "bona-normal", "reference": reference}))
    expected = (0.6 * bona_normal(singles[0], reference[0])
                + 0.4 * bona_normal(singles[1], reference[1]) + 0.5)
    np.testing.assert_allclose(load_detector(path).scores(waves), expected, rtol=1e-6,
                               atol=1e-6)


def test_default_is_the_bona_normal_lcnn_fusion_calibrated_on_loso() -> None:
    """``default`` resolves to the LCNN + LFCC+GMM fusion everywhere the name is used, and
    its card carries the LOSO estimate it was chosen on."""
    from models.inference import NAMED_MODELS, load_detector

    detector = load_detector("default")
    assert NAMED_MODELS["default"] == NAMED_MODELS["lcnn-fusion"]
    assert detector.architecture == "fusion" and detector.card["fusion"]["combine"] == \
        "bona-normal"
    assert set(detector.card["fusion"]["parts"]) == {"lcnn", "lcnn-s1", "lcnn-sc-voc3",
                                                          "lfcc-gmm-fine", "lfcc-gmm-dd"}
    loso = detector.card["loso"]
    assert set(loso["per_engine_eer"]) == {f"T0{i}" for i in range(1, 7)}
    assert loso["pooled_eer"] < 0.2  # RawNet2-tel, the previous default: 34.5 % hidden
    alarms = detector.card["bonafide_false_alarm"]
    assert alarms["sentences"] <= 0.02 and alarms["digits"] <= 0.10


def test_fused_numpy_parts_score_the_same_in_parallel_as_one_after_another() -> None:
    """The default's GMM parts score shares of the batch on a thread pool; every window must
    get its own part's score, in order, whatever the batch size or thread count."""
    from models.inference import load_detector

    fused = load_detector("default").model  # the FusedScorer
    split = ASVspoofSplit(require(CORPUS), "dev")
    waves = [np.resize(load_audio(split.audio_dir / f"{t.utt_id}.flac", 8000), 32000)
             for t in split.trials()[:7]]
    one_by_one = np.stack([np.concatenate([p.score_batch(np.stack([w])) for w in waves])
                           for p in fused.parts], axis=1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for size in (1, 2, 7):
                np.testing.assert_allclose(fused.part_scores(waves[:size]),
                                           one_by_one[:size], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_loso_bona_normal_fusion_ranks_each_fold_against_its_own_bona_fide() -> None:
    from models.tasks.recipes import fuse_bona_normal, parse_fusion

    assert parse_fusion("a+b") == (["a", "b"], None)
    assert parse_fusion("a=0.6+b=0.4") == (["a", "b"], [0.6, 0.4])
    with pytest.raises(ValueError, match="weight"):
        parse_fusion("a=0.6+b")
    ids = [f"u{i}" for i in range(6)]
    labels = [1, 1, 1, 0, 0, 0]
    # part b's scale is 100x part a's; ranks against the fold's bona fide make them equal
    a = FoldScores("T01", ids, labels, [1.0, 2.0, 3.0, 0.5, 0.0, -1.0])
    b = FoldScores("T01", ids, labels, [100.0, 200.0, 300.0, 50.0, 0.0, -100.0])
    fused = fuse_bona_normal({"a": [a], "b": [b]}, {"a": 0.5, "b": 0.5})[0]
    one = fuse_bona_normal({"a": [a]}, {"a": 1.0})[0]
    np.testing.assert_allclose(fused.scores, one.scores, atol=1e-9)
    assert fused.eer() == 0.0

