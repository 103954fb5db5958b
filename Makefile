# sdlite: the commands the README uses.
#   make test   create .venv if missing, install sdlite with its dev extras, run unit tests + every notebook (nbval)
#   make lab    open JupyterLab on notebooks/
#   make student  student versions of the notebooks in student/ (exercises without solutions, no outputs)
#   make demo   the main job: the bundled example story -> a comic page (CPU, storyworld, about a minute)
#   make train-storyworld  rebuild every shipped checkpoint in data/storyworld from scratch (2-core CPU, about 2.8 h)
#   make train-id-encoder  storyworld's PhotoMaker ID encoder, data/storyworld/id_encoder (one core, about 85 minutes)
#   make eval / make benchmarks   the committed results/ and benchmarks/ figures
#   make mutation  mutation testing of the paper's modules with mutmut, one shard per module (MODULE=comic for one)
PYTHON ?= python3
VENV ?= .venv
# Extra flags for `python -m venv`, e.g. VENV_FLAGS=--system-site-packages to reuse a torch you already have.
VENV_FLAGS ?=
# The torch we install when the venv has none. The CPU build: on a machine without a GPU never pull CUDA.
# Elsewhere: make install TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu (or .../cu124)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test unit notebooks lab demo clean-venv execute-notebook train-storyworld train-motion train-id-encoder eval benchmarks student browser-test mutation

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping the installed torch" || \
	  $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg tests notebooks

unit: install
	$(PY) -m pytest -q tests

notebooks: install
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg notebooks

# Student versions of the notebooks (nbgrader's preprocessors): solutions replaced by the placeholder, outputs cleared.
student: install
	$(PY) classroom/student.py --out student

# The notebooks as a student uses them: JupyterLab driven by Playwright in Debian's chromium (outside `make test`;
# needs `apt-get install chromium`). Runs every notebook through the UI, moves every slider, fails on any error.
browser-test: install
	$(PY) -m pip install -q "playwright>=1.40"
	$(PY) classroom/browser_test.py

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)

# Execute one notebook in place from a fresh kernel: make execute-notebook NB=notebooks/01_tokenization.ipynb
execute-notebook: install
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 $(NB)

# The main job: writes out/demo/page.png and the single panels (the demo's own folder, so --force is safe).
demo: install
	$(VENV)/bin/sdlite story --out out/demo/page.png --force

# Every shipped checkpoint, from scratch (each command records itself next to the weights it writes).
train-storyworld: install
	$(PY) -m sdlite.train recognizer --arch a --steps 1500 --force
	$(PY) -m sdlite.train recognizer --arch b --seed 1 --force
	$(PY) -m sdlite.train recognizer --arch a --seed 1 --steps 1000 --out data/recognizer_a_seed1.safetensors --force
	$(PY) -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld --force --threads 1

# The motion predictor and the video decoder (data/motion/), on top of data/storyworld/ (about 80 min on 2 idle cores):
# grid embeddings (pooled + 4x4 cells); a decoder that also reads the cells spatially (4 input channels), trained
# 3000 steps, then fine-tuned 1000 steps with keyframe reading (the shipped decoder) and, for the ablation, without;
# and, for the ablation's decoder-size row, a decoder of twice the channels trained as the first (about 100 min more).
train-motion: install
	$(PY) -m sdlite.train motion-cache --clips 3000 --seed 1 --out runs/motion/train_grid4 --latents --grid 4
	$(PY) -m sdlite.train motion-cache --clips 200 --seed 2 --out runs/motion/val_grid4 --grid 4
	$(PY) -m sdlite.train motion-predictor --cache runs/motion/train_grid4 --val-cache runs/motion/val_grid4 --out runs/motion/predictor_grid4 --export data/motion/predictor --steps 3000 --batch-size 64 --lr 1e-3 --threads 1 --force
	$(PY) -m sdlite.train video-decoder --cache runs/motion/train_grid4 --spatial-channels 4 --out runs/video_spatial --export data/motion/decoder_3000_steps --size base --steps 3000 --batch-size 4 --threads 1 --force
	$(PY) -m sdlite.train video-decoder --cache runs/motion/train_grid4 --init data/motion/decoder_3000_steps --keyframe-attention --out runs/video_kf --export data/motion/decoder --steps 1000 --batch-size 4 --lr 3e-4 --threads 1 --force
	$(PY) -m sdlite.train video-decoder --cache runs/motion/train_grid4 --init data/motion/decoder_3000_steps --out runs/video_plain --export data/motion/decoder_no_keyframes --steps 1000 --batch-size 4 --lr 3e-4 --threads 1 --force
	$(PY) -m sdlite.train video-decoder --cache runs/motion/train_grid4 --spatial-channels 4 --out runs/video_wide --export data/motion/decoder_wide_3000_steps --size wide --steps 3000 --batch-size 4 --save-dtype float16 --threads 1 --force

# storyworld's PhotoMaker ID encoder (on top of data/storyworld/): data/storyworld/id_encoder_base/ is the first
# recipe, 600 tower steps then 4000 steps of the diffusion loss on reference -> target pairs (about 51 minutes on one
# core); data/storyworld/id_encoder/ (the one stories use) fine-tunes it twice with more weight on the hair
# (1200 steps each, about 17 minutes each). Each run is resumable with --resume.
ID_HAIR_TUNE = --tower-steps 0 --steps 1200 --lr 3e-4 --warmup 50 --decay-steps 900 --label-weight 0 \
	--hair-weight 8 --high-noise-weight 5 --threads 1 --force
train-id-encoder: install
	$(PY) -m sdlite.train id-encoder --out runs/id_encoder --export data/storyworld/id_encoder_base --force --threads 1
	$(PY) -m sdlite.train id-encoder --out runs/id_encoder_hair1 --init data/storyworld/id_encoder_base --export runs/id_encoder_hair1/export --seed 1 $(ID_HAIR_TUNE)
	$(PY) -m sdlite.train id-encoder --out runs/id_encoder_hair2 --init runs/id_encoder_hair1/export --export data/storyworld/id_encoder --seed 2 $(ID_HAIR_TUNE)

# The committed evaluation tables (long: run on an otherwise idle machine).
eval: install
	$(PY) -m sdlite.eval storyworld --out results/storyworld.json
	$(PY) -m sdlite.eval consistency --stories 50 --panels 4 4 --batch-stories 25 --shared-settings no_csa,default --threads 1 --out results/consistency.json --force
	$(PY) -m sdlite.eval transitions --clips 100 --steps 8 --methods latent_interpolation,no_predictor,temporal_only,full,true_embeddings,full_polished --threads 1 --out results/motion.json --force
	$(PY) -m sdlite.eval photomaker --stories 100 --tuning-stories 24 --compare base=data/storyworld/id_encoder_base --threads 1 --out results/photomaker.json --force
	$(PY) -m sdlite.eval decoder-ablation --clips 100 --steps 8 --decoder "3000 steps, no keyframe reading=data/motion/decoder_3000_steps" --decoder "3000 + 1000 steps, no keyframe reading=data/motion/decoder_no_keyframes" --decoder "3000 + 1000 steps, keyframe reading (shipped)=data/motion/decoder" --decoder "wide (2x channels), 3000 steps, no keyframe reading=data/motion/decoder_wide_3000_steps" --threads 1 --out results/motion_ablation.json --force

benchmarks: install
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/story_memory.py --panels 8 32 --size 128
	$(PY) benchmarks/bank_memory.py

# Mutation testing (outside `make test`; docs/mutation.md): every paper module in turn, or MODULE=comic (or several,
# MODULE="comic story"); FRESH=1 forgets the cached verdicts. One worker, torch on one thread. Exits 1 when a mutant
# survives that tools/mutation_equivalents.toml does not list as equivalent.
mutation: install
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "mutmut==3.8.1"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) tools/mutation.py $(MODULE) $(if $(FRESH),--fresh)
