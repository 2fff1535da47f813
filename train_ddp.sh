#!/usr/bin/env bash
# One command for every training run, from a 2-core laptop to a multi-node GPU cluster.
#
#   bash train_ddp.sh                      # the tiny pipeline: VAE, planner, samples, evaluation -> out/tiny/
#   bash train_ddp.sh vae [args...]        # one stage through torchrun; args go to the stage's script
#   bash train_ddp.sh planner [args...]
#   bash train_ddp.sh vae-robot [args...]        # tiny LIBERO path: the VAE on the robot task's tracks (planner.py, "Which VAE")
#   bash train_ddp.sh perception [args...]       # tiny LIBERO path: the CNN that stands in for DINOv2 (planner.py, "Which image encoder")
#   bash train_ddp.sh planner-libero [args...]   # LIBERO (Sec. A): needs robot demos, python data.py robot --out data/robot
#   bash train_ddp.sh policy [args...]           # the action head on the LIBERO planner's latents
#
# Settings (environment variables, with defaults):
#   PRESET=tiny            tiny | paper (the stage scripts' --preset)
#   DATA                   the stage's --data (default: the preset's; synthetic, a folder of .npz clips, .tar shards)
#   OUT=out/$PRESET        stage outputs go to $OUT/vae, $OUT/planner, $OUT/policy
#   NPROC_PER_NODE         processes per node: the GPU count ($SLURM_GPUS_ON_NODE under SLURM), or 1 on CPU
#   NNODES=1  NODE_RANK=0  MASTER_ADDR  MASTER_PORT=29500   (under SLURM: from SLURM_NNODES, SLURM_NODEID and
#                          the first host of SLURM_JOB_NODELIST)
#   DRY_RUN=1              print the torchrun command lines instead of running them
#
# Examples with the paper preset (Table F):
#   single node, 8 GPUs:
#     PRESET=paper DATA=/data/shards bash train_ddp.sh vae
#   4 nodes x 8 GPUs under SLURM (one task per node; each task starts torchrun, which starts 8 processes):
#     salloc --nodes=4 --ntasks-per-node=1 --gpus-per-node=8
#     PRESET=paper DATA=/data/shards srun bash train_ddp.sh vae
#   4 nodes x 8 GPUs by hand (run on every node, NODE_RANK=0..3):
#     PRESET=paper NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash train_ddp.sh vae
# A stage resumes from its newest good checkpoint with --resume=true (the pipeline always passes it:
# rerunning `bash train_ddp.sh` continues where it was killed; rm -rf out/tiny to start afresh).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
PRESET=${PRESET:-tiny}
DATA=${DATA:-}
OUT=${OUT:-out/$PRESET}
DRY_RUN=${DRY_RUN:-0}

first_host() {  # the first host of a SLURM node list: "gpu-[07-09,12]" -> gpu-07, "a1,a2" -> a1
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1" | head -n 1
    else
        local list=${1%%,*}
        if [[ $1 == *"["* ]]; then
            local prefix=${1%%\[*} inside=${1#*\[}
            inside=${inside%%\]*}; inside=${inside%%,*}; inside=${inside%%-*}
            list=$prefix$inside
        fi
        echo "$list"
    fi
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-$(first_host "$SLURM_JOB_NODELIST")}
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$NNODES" ]]; then
        echo "train_ddp.sh: SLURM_NTASKS=$SLURM_NTASKS but $NNODES nodes: run one task per node" \
             "(srun --ntasks-per-node=1); torchrun starts the processes of each node" >&2
        exit 1
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(gpu_count)
    [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi

run() {  # print, then run (or only print with DRY_RUN=1)
    echo "+ $(printf '%q ' "$@")"
    [[ $DRY_RUN == 1 ]] || "$@"
}

need() {  # need FILE "what makes it": a clear stop when a stage's input is missing
    if [[ $DRY_RUN != 1 && ! -f $1 ]]; then
        echo "train_ddp.sh: $1 is missing; make it first with: $2" >&2
        exit 1
    fi
}

stage() {  # stage vae|planner|policy [args...]: torchrun the stage's script on this node
    local name=$1; shift
    local launch=(--nproc_per_node="$NPROC_PER_NODE")
    if [[ $NNODES == 1 && -z ${MASTER_ADDR:-} ]]; then
        launch=(--standalone "${launch[@]}")
    else
        launch=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
                --master_port="$MASTER_PORT" "${launch[@]}")
    fi
    local script=$name.py preset=$PRESET inputs=()
    case $name in
        vae) ;;
        planner)
            need "$OUT/vae/ckpt.pt" "bash train_ddp.sh vae"
            inputs=(--vae="$OUT/vae/ckpt.pt") ;;
        vae-robot)  # the tiny VAE trained on the robot task's tracks; at paper scale the one general VAE serves LIBERO
            [[ $PRESET == tiny ]] || { echo "train_ddp.sh: vae-robot is the tiny preset's; PRESET=$PRESET plans" \
                                            "LIBERO in its general VAE ($OUT/vae)" >&2; exit 2; }
            script=vae.py preset=tiny_robot ;;
        perception)  # tiny: the CNN image encoder trained on the demos' actions; at paper scale DINOv2 is pretrained
            [[ $PRESET == tiny ]] || { echo "train_ddp.sh: perception is the tiny preset's; PRESET=$PRESET sees" \
                                            "through the pretrained DINOv2" >&2; exit 2; }
            need "$OUT/vae-robot/ckpt.pt" "bash train_ddp.sh vae-robot"
            script=policy.py preset=perception_tiny
            inputs=(--vae="$OUT/vae-robot/ckpt.pt") ;;
        planner-libero)  # Sec. A: the LIBERO planner (tiny: in the robot VAE's latent space, through the trained CNN;
                         # paper: the general VAE's, through DINOv2)
            local vae=$OUT/vae/ckpt.pt make="bash train_ddp.sh vae"
            [[ $PRESET != tiny ]] || { vae=$OUT/vae-robot/ckpt.pt; make="bash train_ddp.sh vae-robot"; }
            need "$vae" "$make"
            script=planner.py
            case $PRESET in paper) preset=libero ;; tiny) preset=libero_tiny ;; esac
            inputs=(--vae="$vae")
            if [[ $PRESET == tiny ]]; then
                need "$OUT/perception/ckpt.pt" "bash train_ddp.sh perception"
                inputs+=(--image_init="$OUT/perception/ckpt.pt")
            fi ;;
        policy)
            need "$OUT/planner-libero/ckpt.pt" "bash train_ddp.sh planner-libero"
            inputs=(--planner="$OUT/planner-libero/ckpt.pt") ;;
        *) echo "train_ddp.sh: unknown stage '$name' (vae, planner, vae-robot, perception, planner-libero, policy; none = the pipeline)" >&2
           exit 2 ;;
    esac
    [[ -z $DATA ]] || inputs+=(--data="$DATA")
    run "$PYTHON" -m torch.distributed.run "${launch[@]}" "$script" --preset="$preset" --out_dir="$OUT/$name" \
        "${inputs[@]}" "$@"
}

pipeline() {  # the README's main job on the embedded default: everything under $OUT (out/tiny)
    local t0=$SECONDS models=(--vae "$OUT/vae/ckpt.pt" --planner "$OUT/planner/ckpt.pt")
    stage vae --resume=true
    stage planner --resume=true
    run "$PYTHON" sample.py "${models[@]}" --out "$OUT/samples"
    run "$PYTHON" sample.py "${models[@]}" --out "$OUT/samples/text" --text "the red square moves to the right"
    run "$PYTHON" eval.py recon --vae "$OUT/vae/ckpt.pt" --json "$OUT/eval/recon.json"
    run "$PYTHON" eval.py tracks "${models[@]}" --clips 32 --pokes 0,1,4,16 --json "$OUT/eval/tracks.json"
    run "$PYTHON" eval.py tracks "${models[@]}" --clips 32 --pokes 0 --text --json "$OUT/eval/tracks_text.json"
    [[ $DRY_RUN == 1 ]] || summary "$((SECONDS - t0))"
}

summary() {  # where everything is, and the metric table from the evaluation's JSON files
    "$PYTHON" - "$OUT" "$1" <<'EOF'
import json, os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
print(f"\n=== pipeline done in {seconds // 60} min {seconds % 60} s; everything is under {out}/ ===")
for what, files in [("checkpoints", "vae/ckpt.pt planner/ckpt.pt"), ("training logs", "vae/log.txt planner/log.txt"),
                    ("validation pictures", "vae/val.png planner/val.png"),
                    ("poke samples", "samples/samples.png samples/samples.gif"),
                    ("text samples", "samples/text/samples.png samples/text/samples.gif"),
                    ("metrics (JSON)", "eval/recon.json eval/tracks.json eval/tracks_text.json")]:
    print(f"  {what:<20} " + "  ".join(os.path.join(out, f) for f in files.split()))

read = lambda name: json.load(open(os.path.join(out, "eval", name)))
pck = read("recon.json")["pck"]
print("\nreconstruction: PCK delta_avg at 256 px, higher is better")
print(f"  VAE  AE {pck['VAE']['AE']['delta_avg']:.1f}  MAE {pck['VAE']['MAE']['delta_avg']:.1f}    baselines (MAE): "
      f"static {pck['static']['MAE']['delta_avg']:.1f}, nearest-neighbour {pck['nearest_neighbour']['MAE']['delta_avg']:.1f}")
print("\nplanned motion: Min-MSE over K = 8 samples at 128 px, lower is better; EPE of the poked points in px")
print(f"  {'condition':<12}{'planner':>9}{'EPE':>7}{'straight-to-poke':>18}{'static':>9}")
for name in ("tracks.json", "tracks_text.json"):
    runs = read(name)
    rows = {(r["method"], r["pokes"]): r for r in runs["rows"]}
    for (method, pokes), r in rows.items():
        if method == "planner":
            label = ("text" if runs["text"] else "nothing") if pokes == "0" else f"{pokes} poke{'s' * (pokes != '1')}"
            straight = rows.get(("straight_to_poke", pokes))
            epe = f"{r['epe']:.1f}" if pokes != "0" else "-"
            straight = f"{straight['min']:.1f}" if straight else "-"
            print(f"  {label:<12}{r['min']:9.1f}{epe:>7}{straight:>18}{rows[('static', pokes)]['min']:9.1f}")
print("  (the paper's sampler; sample.py adds poke guidance by default, README \"Sampling\")")
import numpy as np
with np.load(os.path.join(out, "samples", "samples.npz")) as npz:
    s = json.loads(str(npz["settings"]))
print(f"\nsample.py ({s['n_pokes']} pokes, K = {s['k']}, poke guidance {s['poke_guidance']}): poked points end "
      f"{s['poke_epe_px']:.1f} px from their goals in the {s['width']}x{s['height']} frame; the clip's other tracks "
      f"{s['held_out_epe_px']:.1f} px from their true ends (standing still: {s['held_out_static_px']:.1f})")
EOF
}

if [[ $# -eq 0 ]]; then
    pipeline
else
    stage "$@"
fi
