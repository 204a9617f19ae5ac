# Worker image for running `controlset annotate` on Dataflow (or Flink/Spark
# with --environment_type DOCKER). The Beam SDK in this image must be the
# version that submits the job: keep BEAM_VERSION equal to the apache-beam
# installed where you run `controlset annotate --runner DataflowRunner`.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG BEAM_VERSION

WORKDIR /opt/controlset
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY annotators annotators
COPY pipelines pipelines
COPY training training
COPY controlset controlset
# The CUDA build of torch comes from PyPI's default index; pinning Beam keeps
# the SDK harness of the base image.
RUN pip install --no-cache-dir . "apache-beam[gcp]==${BEAM_VERSION}"

# Model weights are baked in: workers have no reason to reach a model hub.
#   weights/annotators: ControlNetHED.pth, mlsd_large_512_fp32.pth, body_pose_model.pth, ...
#   weights/hf: a Hugging Face cache (HF_HOME) holding the transformers models used.
COPY weights /opt/weights
# Pass --weights /opt/weights/annotators to `controlset annotate`.
ENV HF_HOME=/opt/weights/hf HF_HUB_OFFLINE=1

ENTRYPOINT ["/opt/apache/beam/boot"]
