# callshield: every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYANNOTE_METRICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: help install protos test lint run run-redis bench bench-models bench-gpu train clean \
	bench-diarization train-diarization bench-plugins plugins train-baselines vocode \
	bench-generalization loso-folds train-gpu bench-memory train-rawnet2 docs \
	console vocode-extra bench-adapt train-vocoder bench-console bench-recalibrate
CORPUS := ../shared/corpus
VOCODED := runs/vocoded/train
# The default model's fusion recipe (weights per part) and calibration prior (LCNN_FUSION_CARD.md)
DEFAULT_RECIPE := lcnn=0.2+lcnn-s1=0.2+lcnn-sc-voc3=0.2+lfcc-gmm-fine=0.2+lfcc-gmm-dd=0.2
DEFAULT_PRIOR := 0.92
# Where `make train` keeps the default's parts before fusing them (`python -m models unfuse`
# writes them back out of the shipped default)
PARTS := runs/release

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/install-system.sh
	bash scripts/install-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv with every dependency and the `client` command

protos: install ## regenerate the gRPC stubs from protos/
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/callshield/v1/detection.proto

test: install ## the whole test suite (starts its own redis-server)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

docs: install ## regenerate docs/reference/cli.md from every program's --help
	$(PY) scripts/gen_cli_docs.py

lint: install
	$(VENV)/bin/ruff check .

run: install ## server with the in-process queue and the default model on 127.0.0.1:50051
	$(PY) -m server --listen 127.0.0.1:50051 --model default --queue inprocess

console: install ## the fraud-desk console on http://127.0.0.1:8765 watching `make run` (export the same CALLSHIELD_ADMIN_TOKEN for both; CALLSHIELD_CONSOLE_USERS=users file; docs/console.md)
	$(PY) -m console --server 127.0.0.1:50051

run-redis: install ## a local redis-server, two workers and the server
	bash scripts/run-redis.sh

VOCODE := $(PY) -m models vocode --protocol $(CORPUS)/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt \
	--audio-dir $(CORPUS)/ASVspoof2019_LA_train/flac --out $(VOCODED)

# One process per vocoder (one thread each: ~12 min on 2 cores), then a pass that finds
# every file written and lists both vocoders' items in one protocol.
vocode: install ## vocoded copies of the training bona fide (HiFi-GAN x2) -> runs/vocoded/train
	$(VOCODE) --vocoder hifigan-universal --threads 1 --quiet & a=$$!; \
	$(VOCODE) --vocoder hifigan-lj --threads 1 --quiet & b=$$!; \
	wait $$a && wait $$b
	$(VOCODE) --vocoder hifigan-universal --vocoder hifigan-lj --quiet

train: install vocode-extra ## train the default model: two LCNN seeds and an LCNN on new callers and their vocoded copies (resumable; runs/lcnn-tel*; parts in runs/release) + their fusion with two LFCC+GMMs
	$(PY) -m models train models/configs/lcnn_tel.yaml
	$(PY) -m models ship $(PARTS)/lcnn.pt --recipe lcnn \
		--fold-scale "12 epochs on every corpus trial per fold"
	$(PY) -m models train models/configs/lcnn_s1_tel.yaml
	$(PY) -m models ship $(PARTS)/lcnn_s1.pt --recipe lcnn-s1 \
		--fold-scale "12 epochs on every corpus trial per fold"
	$(PY) -m models train models/configs/lcnn_sc_voc3_tel.yaml
	$(PY) -m models ship $(PARTS)/lcnn_sc_voc3.pt --recipe lcnn-sc-voc3 \
		--fold-scale "6 epochs on every corpus trial, the Speech Commands train bona fide and their vocoded copies per fold"
	$(PY) -m models train models/configs/lfcc_gmm_fine.yaml
	$(PY) -m models fuse --out models/checkpoints/lcnn_fusion.pt \
		--part $(PARTS)/lcnn.pt=lcnn --part $(PARTS)/lcnn_s1.pt=lcnn-s1 \
		--part $(PARTS)/lcnn_sc_voc3.pt=lcnn-sc-voc3 \
		--part $(PARTS)/lfcc_gmm_fine.pt=lfcc-gmm-fine \
		--part models/checkpoints/lfcc_gmm.pt=lfcc-gmm-dd \
		--weight 0.2 --weight 0.2 --weight 0.2 --weight 0.2 --weight 0.2 \
		--name lcnn-gmm-fusion --version 6
	$(PY) -m models ship models/checkpoints/lcnn_fusion.pt \
		--recipe $(DEFAULT_RECIPE) --prior $(DEFAULT_PRIOR) \
		--fold-scale "LCNN parts: 12 epochs on every corpus trial per fold (lcnn-sc-voc3: 6 epochs, plus the Speech Commands train bona fide and their vocoded copies); LFCC+GMM parts: 32 components refitted per fold"
	{ $(PY) -m models card --model default; cat models/checkpoints/LCNN_FUSION_NOTES.md; } \
		> models/checkpoints/LCNN_FUSION_CARD.md

train-rawnet2: install ## the previous default, RawNet2-tel (resumable; runs/rawnet2-tel), and its card
	$(PY) -m models train models/configs/rawnet2_tel.yaml
	$(PY) -m models card --model rawnet2-tel > models/checkpoints/RAWNET2_TEL_CARD.md

loso-folds: install vocode-extra ## train the LOSO folds of the default's LCNN parts (long; resumable; other recipes: experiments/README.md)
	$(PY) -m bench.generalization train-folds --recipe lcnn --recipe lcnn-s1 --recipe lcnn-sc-voc3 \
		--threads 2
	$(PY) -m bench.generalization export-folds

# The vocoder-held-out step needs `make vocode-extra`'s copies; its first run trains the default's
# lcnn-sc-voc3 part once per vocoder family left out (about 30 minutes on 2 cores, kept in
# runs/vocoder-held-out/ and reused by later runs)
bench-generalization: install ## LOSO EER per recipe, new-caller false alarms, vocoder held out, calls (reduced) -> bench/results/{generalization,newcallers,vocoder-held-out,calls}.*
	$(PY) -m bench.generalization report --mode reduced
	$(PY) -m bench.newcallers
	$(PY) -m bench.vocoder_held_out --recipe lfcc-gmm-fine --recipe lcnn-sc-voc3 --threads 2
	$(PY) -m bench.calls --mode reduced

bench-adapt: install ## the default adapted to the extra bona fide train speakers, before/after -> bench/results/adapt.*
	$(PY) -m bench.adapt

bench-recalibrate: install ## analyst verdicts -> models calibrate -> ReloadModel: false alarms and spoof calls flagged before/after -> bench/results/recalibrate.*
	$(PY) -m bench.recalibrate

EXTRA_BONAFIDE := ../shared/extra-bonafide/speech-commands
VOCODE_EXTRA := $(PY) -m models vocode --protocol $(EXTRA_BONAFIDE)/bonafide.train.txt \
	--audio-dir $(EXTRA_BONAFIDE)/flac --threads 1 --quiet
# The Speech Commands train clips through one HiFi-GAN (the first 400: HiFi-GAN runs at about
# 1 s per second of audio on one core), then all of them through vocos-8k and nsf-8k (minutes
# each): the spoofs of the default's lcnn-sc-voc3 part (models/configs/lcnn_sc_voc3_tel.yaml); resumable
vocode-extra: install ## vocoded copies of the extra bona fide train clips -> runs/vocoded/sc-train{,-vocos,-nsf}
	$(VOCODE_EXTRA) --shard 0/2 --limit 400 --vocoder hifigan-universal --out runs/vocoded/sc-train & a=$$!; \
	$(VOCODE_EXTRA) --vocoder vocos-8k --out runs/vocoded/sc-train-vocos & b=$$!; \
	wait $$a && wait $$b
	$(VOCODE_EXTRA) --vocoder nsf-8k --out runs/vocoded/sc-train-nsf

train-vocoder: install ## train the 8 kHz Vocos-style and NSF vocoders on the corpus' train bona fide (resumable, 1 thread; exports models/vocoders/checkpoints/{vocos8k,nsf8k}.pt)
	$(PY) -m models train-vocoder models/configs/vocoder_vocos8k.yaml
	$(PY) -m models train-vocoder models/configs/vocoder_nsf8k.yaml

train-gpu: ## on a CUDA machine: vocode, the default's LCNN parts' LOSO folds, the calls estimate in full mode ($$OUT)
	bash scripts/train-gpu.sh

train-baselines: install ## train the LFCC+GMM baseline (lfcc-gmm, a part of the default too), calibrated on its LOSO scores
	$(PY) -m models train models/configs/lfcc_gmm_dd.yaml
	$(PY) -m models ship models/checkpoints/lfcc_gmm.pt --recipe lfcc-gmm-dd \
		--fold-scale "32 components, 20000 frames per class, refitted per fold"
	$(PY) -m models card --model lfcc-gmm > models/checkpoints/LFCC_GMM_CARD.md

bench-models: install ## model EER and CPU throughput -> bench/results/models.{json,md}
	$(PY) -m bench.models

bench: install bench-models ## service capacity, shipped defaults (MIXED+SPLIT x 2 connection patterns) -> bench/results/service.{json,md}
	$(PY) -m bench.service

bench-diarization: install ## DER, streaming RTF, per-speaker alerts -> bench/results/diarization.{json,md}
	$(PY) -m bench.diarization

train-diarization: install ## simulate calls, train the segmentation model (diarization/MODEL_CARD.md)
	$(PY) -m diarization.simulate runs/diarization/sim --train 240 --dev 24
	nice -n 19 $(PY) -m diarization.train runs/diarization/sim/database.yml --minutes 25

bench-plugins: install ## plugin latency per 20 ms frame, calls held -> bench/results/plugins.{json,md}
	$(PY) -m bench.plugins

bench-memory: install ## server RSS over long calls, abandoned streams, a huge Detect -> bench/results/memory.*
	$(PY) -m bench.memory

bench-console: install ## 50 live calls through `make run`'s server with the console + chromium watching: event delay server -> browser, server CPU with/without the feed -> bench/results/console.*
	$(PY) -m bench.console

plugins: install ## the telephony plugins beside a server on 127.0.0.1:50051 (docs/telephony.md)
	$(PY) -m plugins serve --audiosocket 127.0.0.1:9092 --twilio 127.0.0.1:8080/twilio \
		--freeswitch 127.0.0.1:8080/fork --audiohook 127.0.0.1:8080/audiohook \
		--detector 127.0.0.1:50051

bench-gpu: ## GPU worker throughput (needs only torch): bench/gpu.py
	$(PYTHON) bench/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
