# Continuum: multi-stage image. The build stage compiles a release binary
# (Swift standard library linked statically) and fetches the default model;
# the runtime stage is Debian slim with only the runtime libraries (OpenBLAS),
# running as a non-root user. PostgreSQL is external: give DATABASE_URL.
#
#   docker build -t continuum .
#   docker run -p 8080:8080 -e DATABASE_URL=postgres://user:pass@db:5432/continuum continuum
#
# To mount a model instead of baking it in: build with --build-arg FETCH_MODEL=0
# and run with -v /path/model.gguf:/models/model.gguf -e CONTINUUM_MODEL=/models/model.gguf.

ARG SWIFT_IMAGE=swift:6.3-bookworm

FROM ${SWIFT_IMAGE} AS build
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenblas-dev python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so they are cached across source changes.
COPY Package.swift Package.resolved* ./
RUN swift package resolve
COPY Sources Sources
COPY Tests Tests
RUN swift build -c release --product continuum --static-swift-stdlib \
 && mkdir -p /out/bin \
 && cp .build/release/continuum /out/bin/ \
 && cp -R .build/release/*.resources /out/bin/
ARG FETCH_MODEL=1
RUN mkdir -p /out/models \
 && if [ "$FETCH_MODEL" = 1 ]; then \
      HOME=/tmp/home /out/bin/continuum fetch-model \
      && cp /tmp/home/.cache/continuum/models/*.gguf /out/models/; \
    fi

FROM debian:bookworm-slim AS runtime
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenblas0-pthread ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --uid 10001 continuum
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build --chown=continuum /out/models/ /home/continuum/.cache/continuum/models/
USER continuum
WORKDIR /home/continuum
ENV OPENBLAS_NUM_THREADS=1
EXPOSE 8080
# Liveness: GET /healthz; readiness: GET /readyz (model, database, migrations).
ENTRYPOINT ["/usr/local/bin/continuum", "serve", "--host", "0.0.0.0", "--port", "8080"]
