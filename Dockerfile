# syntax=docker/dockerfile:1
# The VoidRun server image. Two stages: `deps` has the compilers native modules (better-sqlite3,
# node-pty) may need; the runtime image has only Node, the installed modules, the sources and what
# the sandbox drivers call on the host (runc, debootstrap, QEMU, iproute2, iptables; gcc and libc6-dev
# build the container sandboxes' static init on first start).

FROM node:20-bookworm AS deps
WORKDIR /app
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
# `npm ci` refuses this lock file on some registries (an optional vite dependency); install is
# equivalent here because the lock file pins every version.
RUN npm install --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY shared ./shared
COPY agent ./agent
COPY server ./server
COPY client ./client
COPY scripts ./scripts
# Type-check and compile the server (dist/server) during the build, then drop dev-only packages
# (esbuild stays: the server bundles the sandbox agent with it on first start).
RUN npm run typecheck \
 && npm run build:server \
 && npm prune --omit=dev --no-audit --no-fund

FROM node:20-bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      runc debootstrap ca-certificates iproute2 iptables nftables conntrack util-linux qemu-system-x86 qemu-utils e2fsprogs gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=deps /app/package.json /app/tsconfig.json ./
COPY --from=deps /app/shared ./shared
COPY --from=deps /app/agent ./agent
COPY --from=deps /app/server ./server
COPY --from=deps /app/client ./client
COPY --from=deps /app/scripts ./scripts
COPY --from=deps /app/dist/server ./dist/server
COPY openapi.yml ./
ARG VOIDRUN_COMMIT=unknown
ENV NODE_ENV=production \
    SERVER_PORT=8080 \
    DATA_DIR=/var/lib/voidrun \
    BASE_IMAGES_DIR=/var/lib/hyper-fleet/base-images \
    INSTANCES_DIR=/var/lib/hyper-fleet/instances \
    SNAPSHOTS_DIR=/var/lib/hyper-fleet/snapshots \
    VOIDRUN_COMMIT=${VOIDRUN_COMMIT}
VOLUME ["/var/lib/voidrun", "/var/lib/hyper-fleet/base-images", "/var/lib/hyper-fleet/instances", "/var/lib/hyper-fleet/snapshots"]
EXPOSE 8080
# `npm start` runs the compiled server (scripts/start.mjs → dist/server/main.js), as in a checkout.
CMD ["npm", "start"]
