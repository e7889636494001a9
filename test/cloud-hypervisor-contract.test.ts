import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ValidateFunction } from 'ajv';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { CLOUD_HYPERVISOR_ENDPOINTS } from '../server/hypervisor/cloud-hypervisor/api-client.js';
import { CloudHypervisorDriver, type CloudHypervisorDriverOptions, type GuestAddress, type VmAttachment, type VmHostNetwork } from '../server/hypervisor/cloud-hypervisor/driver.js';
import type { NetworkBytes, NetworkPolicy } from '../server/hypervisor/network/types.js';
import { buildVmConfig, GUEST_CID, macForSandbox, netmaskFromPrefix, rebaseSnapshotConfig, type VmConfigInput } from '../server/hypervisor/cloud-hypervisor/vm-config.js';
import { connectHybridVsock } from '../server/hypervisor/cloud-hypervisor/vsock.js';
import type { SandboxSpec } from '../server/hypervisor/types.js';
import { type GuestConfig, vmImagePaths, vmInstancePaths } from '../server/hypervisor/vm/guest.js';

/*
 * cloud-hypervisor cannot run on this machine (no binary, and /dev/kvm is a PVM host), so the
 * driver is held to cloud-hypervisor's published API description instead: every body it sends
 * validates against the schema in ../shared/reference/cloud-hypervisor-openapi.yaml, and its whole
 * lifecycle runs against a fake VMM (a Node script speaking the same API and the hybrid vsock
 * handshake) passed as the driver's binary.
 */

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const referenceSpec = join(root, '..', 'shared', 'reference', 'cloud-hypervisor-openapi.yaml');
const specPresent = existsSync(referenceSpec);
if (!specPresent) console.log(`cloud-hypervisor schema checks SKIPPED: ${referenceSpec} is absent`);

type Operation = { requestBody?: { content: Record<string, { schema: { $ref?: string } }> } };
type OpenApiDoc = { paths: Record<string, Record<string, Operation>>; components: { schemas: Record<string, unknown> } };

/**
 * Schema objects made strict: cloud-hypervisor's schemas allow any extra property, so a misspelt
 * field (`boot_vcpu`) would validate and then be ignored by the VMM. Here every object schema
 * with `properties` refuses others. OpenAPI 3.0 `nullable` becomes a JSON-Schema type union.
 */
function strictSchema(schema: unknown): unknown {
  if (!schema || typeof schema !== 'object' || Array.isArray(schema)) return schema;
  const s = { ...(schema as Record<string, unknown>) };
  if (s.nullable === true && typeof s.type === 'string') s.type = [s.type, 'null'];
  delete s.nullable;
  if (s.properties && typeof s.properties === 'object') {
    s.properties = Object.fromEntries(Object.entries(s.properties as Record<string, unknown>).map(([k, v]) => [k, strictSchema(v)]));
    if (s.additionalProperties === undefined) s.additionalProperties = false;
  }
  if (s.items) s.items = strictSchema(s.items);
  if (s.additionalProperties && typeof s.additionalProperties === 'object') s.additionalProperties = strictSchema(s.additionalProperties);
  for (const k of ['allOf', 'anyOf', 'oneOf'] as const) if (Array.isArray(s[k])) s[k] = (s[k] as unknown[]).map(strictSchema);
  return s;
}

const INTEGER_FORMATS: Record<string, [number, number]> = {
  int8: [-128, 127],
  int16: [-32768, 32767],
  int32: [-(2 ** 31), 2 ** 31 - 1],
  int64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  uint8: [0, 255],
  uint16: [0, 65535],
  uint32: [0, 2 ** 32 - 1],
};

class CloudHypervisorSchema {
  readonly doc: OpenApiDoc;
  readonly #ajv: Ajv;
  readonly #validators = new Map<string, ValidateFunction>();

  constructor(file: string) {
    this.doc = parse(readFileSync(file, 'utf8')) as OpenApiDoc;
    this.#ajv = new Ajv({ strict: false, allErrors: true });
    for (const [name, [min, max]] of Object.entries(INTEGER_FORMATS)) {
      this.#ajv.addFormat(name, { type: 'number', validate: (n: number) => Number.isInteger(n) && n >= min && n <= max });
    }
    const schemas = Object.fromEntries(Object.entries(this.doc.components.schemas).map(([k, v]) => [k, strictSchema(v)]));
    // The spec's own `$ref`s are `#/components/schemas/…`: registered under one id with that
    // shape, they resolve unchanged.
    this.#ajv.addSchema({ $id: 'cloud-hypervisor', components: { schemas } });
  }

  validator(schemaName: string): ValidateFunction {
    let v = this.#validators.get(schemaName);
    if (!v) {
      v = this.#ajv.compile({ $ref: `cloud-hypervisor#/components/schemas/${schemaName}` });
      this.#validators.set(schemaName, v);
    }
    return v;
  }

  /** Errors of `body` against the request schema of `method path`, or of the operation itself. */
  check(schemaName: string, body: unknown): string[] {
    const v = this.validator(schemaName);
    return v(body) ? [] : (v.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message} ${JSON.stringify(e.params)}`);
  }

  checkRequest(method: string, path: string, body: unknown): string[] {
    const op = this.doc.paths[path]?.[method.toLowerCase()];
    if (!op) return [`${method} ${path} is not in cloud-hypervisor's API`];
    const ref = op.requestBody?.content['application/json']?.schema.$ref;
    if (!ref) return body === null ? [] : [`${method} ${path} takes no body, but one was sent`];
    const name = ref.replace('#/components/schemas/', '');
    return this.check(name, body).map((e) => `${method} ${path} (${name}): ${e}`);
  }
}

const schema = specPresent ? new CloudHypervisorSchema(referenceSpec) : undefined;

const ID_A = '65a1b2c3d4e5f60718293a4b';
const ID_B = '65a1b2c3d4e5f60718293a4c';
const ID_FAILING = '65a1b2c3d4e5f60718293a4d';

/** A policy unlike the drivers' default, to see it passed through. */
const DENY_POLICY: NetworkPolicy = { mode: 'bridge', egress: 'deny', allow: ['allowed.test'], deny: [], maxEgressBytes: null, egressCut: false };

function sandboxSpec(id: string, overrides: Partial<SandboxSpec> = {}): SandboxSpec {
  return { id, name: `box-${id.slice(-4)}`, rootfs: '/unused', image: 'debian', cpu: 2, memMb: 512, diskMb: 2048, envVars: { GREETING: 'hi' }, ...overrides };
}

function configInput(overrides: Partial<SandboxSpec> = {}, prefixLength = 22): VmConfigInput {
  const spec = sandboxSpec(ID_A, overrides);
  const instance = vmInstancePaths('/var/lib/voidrun/instances', spec.id);
  return {
    spec,
    image: vmImagePaths('/var/lib/voidrun/base-images', 'debian'),
    instance,
    agentDisk: '/var/lib/voidrun/base-images/agent/agent-abc.img',
    network: { tap: 'vr0718293a4b', address: '192.168.100.7', prefixLength, gateway: '192.168.100.1' },
    serialLog: join(instance.dir, 'serial.log'),
  };
}

describe('contract: vm.create body (buildVmConfig)', () => {
  it('contract: netmaskFromPrefix turns prefix lengths into dotted masks', () => {
    for (const [prefix, mask] of [
      [0, '0.0.0.0'],
      [8, '255.0.0.0'],
      [22, '255.255.252.0'],
      [24, '255.255.255.0'],
      [30, '255.255.255.252'],
      [32, '255.255.255.255'],
    ] as const) {
      expect(netmaskFromPrefix(prefix), `/${prefix}`).toBe(mask);
    }
    expect(() => netmaskFromPrefix(33)).toThrow(/prefix length/);
  });

  it.each([
    { cpu: 1, memMb: 128, bytes: 134_217_728 },
    { cpu: 2, memMb: 1024, bytes: 1_073_741_824 },
    { cpu: 8, memMb: 16384, bytes: 17_179_869_184 },
  ])('contract: $cpu vCPUs and $memMb MiB become boot_vcpus and memory.size in bytes', ({ cpu, memMb, bytes }) => {
    const config = buildVmConfig(configInput({ cpu, memMb }));
    expect(config.cpus).toEqual({ boot_vcpus: cpu, max_vcpus: cpu });
    expect(config.memory.size).toBe(bytes);
  });

  it('contract: boots the uncompressed vmlinux with the initrd and a static address on eth0 like the original VoidRun', () => {
    const input = configInput();
    const config = buildVmConfig(input);
    expect(config.payload.kernel).toBe(input.image.vmlinux);
    expect(config.payload.kernel.endsWith('/vmlinux')).toBe(true);
    expect(config.payload.initramfs).toBe(input.image.initrd);
    expect(config.payload.cmdline.split(' ')).toEqual(expect.arrayContaining(['root=/dev/vda', 'console=ttyS0', 'rw', 'ip=192.168.100.7::192.168.100.1:255.255.252.0::eth0:off']));
  });

  it('appends SANDBOX_KERNEL_CMDLINE after our parameters, so its own win', () => {
    const cmdline = buildVmConfig({ ...configInput(), extraCmdline: 'loglevel=3 root=/dev/vdz' }).payload.cmdline;
    expect(cmdline.endsWith(' loglevel=3 root=/dev/vdz')).toBe(true);
    expect(cmdline.startsWith(buildVmConfig(configInput()).payload.cmdline)).toBe(true);
  });

  it('contract: disks are overlay (rw qcow2 with its backing file), agent disk (ro), config disk (raw) — vda, vdb, vdc', () => {
    const input = configInput();
    const { disks } = buildVmConfig(input);
    expect(disks.map((d) => d.path)).toEqual([input.instance.overlay, input.agentDisk, input.instance.configDisk]);
    expect(disks[0]).toMatchObject({ readonly: false, image_type: 'Qcow2', backing_files: true });
    expect(disks[1]).toMatchObject({ readonly: true, image_type: 'Raw' });
    expect(disks[2]).toMatchObject({ image_type: 'Raw' });
  });

  it('contract: one TAP with a MAC derived from the sandbox id, locally administered and unicast', () => {
    const { net } = buildVmConfig(configInput());
    expect(net).toEqual([{ id: 'eth0', tap: 'vr0718293a4b', mac: macForSandbox(ID_A) }]);
    expect(macForSandbox(ID_A)).toBe(macForSandbox(ID_A));
    expect(macForSandbox(ID_A)).not.toBe(macForSandbox(ID_B));
    for (const id of [ID_A, ID_B, 'x', '']) {
      const mac = macForSandbox(id);
      expect(mac).toMatch(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/);
      const first = Number.parseInt(mac.slice(0, 2), 16);
      expect(first & 0b10, 'locally administered').toBe(0b10);
      expect(first & 0b01, 'unicast').toBe(0);
    }
  });

  it('contract: hybrid vsock on the instance socket, entropy from /dev/urandom, serial to a file, console off', () => {
    const input = configInput();
    const config = buildVmConfig(input);
    expect(config.vsock).toEqual({ cid: GUEST_CID, socket: input.instance.vsockSocket });
    expect(config.vsock.cid).toBeGreaterThanOrEqual(3);
    expect(config.rng).toEqual({ src: '/dev/urandom' });
    expect(config.serial).toEqual({ mode: 'File', file: input.serialLog });
    expect(config.console).toEqual({ mode: 'Off' });
  });

  it('contract: refuses a spec with no whole vCPU or memory', () => {
    expect(() => buildVmConfig(configInput({ cpu: 0 }))).toThrow(/cpu/);
    expect(() => buildVmConfig(configInput({ memMb: 0.5 }))).toThrow(/memMb/);
  });

  it.skipIf(!specPresent)('contract: every built VmConfig validates against cloud-hypervisor’s VmConfig schema (strict: no unknown fields)', () => {
    for (const overrides of [{}, { cpu: 1, memMb: 128 }, { cpu: 16, memMb: 65536 }]) {
      expect(schema!.check('VmConfig', buildVmConfig(configInput(overrides)))).toEqual([]);
    }
    // The strict check does catch a misspelt field.
    const misspelt = { ...buildVmConfig(configInput()), cpus: { boot_vcpu: 1, max_vcpus: 1 } };
    expect(schema!.check('VmConfig', misspelt).join('\n')).toMatch(/boot_vcpu|boot_vcpus/);
  });

  it.skipIf(!specPresent)('contract: every endpoint the API client calls exists in cloud-hypervisor’s API with that method', () => {
    for (const { method, path } of Object.values(CLOUD_HYPERVISOR_ENDPOINTS)) {
      expect(schema!.doc.paths[path]?.[method.toLowerCase()], `${method} ${path}`).toBeDefined();
    }
  });

  it.skipIf(!specPresent)('contract: snapshot and restore bodies validate against VmSnapshotConfig and RestoreConfig', () => {
    expect(schema!.checkRequest('PUT', '/vm.snapshot', { destination_url: 'file:///var/lib/voidrun/instances/x/snapshot-1/vm' })).toEqual([]);
    expect(schema!.checkRequest('PUT', '/vm.restore', { source_url: 'file:///var/lib/voidrun/instances/x/restore/vm' })).toEqual([]);
    expect(schema!.checkRequest('PUT', '/vm.restore', { source: 'file:///x' }).length).toBeGreaterThan(0);
  });

  it('contract: a snapshot’s config is rebased onto the new instance’s disks, TAP, vsock socket and serial file', () => {
    const captured = { ...buildVmConfig(configInput()), platform: { num_pci_segments: 1 } };
    const target = vmInstancePaths('/srv/instances', ID_B);
    const rebased = rebaseSnapshotConfig(captured, { instance: target, agentDisk: '/srv/agent.img', tap: 'vr0718293a4c', serialLog: '/srv/instances/b/serial.log' });
    expect(rebased.disks!.map((d) => d.path)).toEqual([target.overlay, '/srv/agent.img', target.configDisk]);
    expect(rebased.disks![0]).toMatchObject({ image_type: 'Qcow2', backing_files: true });
    expect(rebased.net).toEqual([{ ...captured.net![0], tap: 'vr0718293a4c' }]);
    expect(rebased.vsock).toEqual({ cid: GUEST_CID, socket: target.vsockSocket });
    expect(rebased.serial).toEqual({ mode: 'File', file: '/srv/instances/b/serial.log' });
    expect(rebased.memory).toEqual(captured.memory);
    expect(rebased.platform).toEqual({ num_pci_segments: 1 });
    expect(() => rebaseSnapshotConfig({ ...captured, disks: [] }, { instance: target, agentDisk: '', tap: '', serialLog: '' })).toThrow(/3/);
    // A VM without a NIC (network mode none) is restored without one; one with a NIC needs a TAP.
    const { net: _net, ...withoutNic } = captured;
    expect(rebaseSnapshotConfig(withoutNic, { instance: target, agentDisk: '/srv/agent.img', serialLog: '/srv/instances/b/serial.log' }).net).toBeUndefined();
    expect(() => rebaseSnapshotConfig(captured, { instance: target, agentDisk: '/srv/agent.img', serialLog: '' })).toThrow(/no TAP/);
  });

  it('contract: a sandbox with network mode none has no NIC and no ip= on its command line', () => {
    const { network: _network, ...input } = configInput({ network: { ...DENY_POLICY, mode: 'none' } });
    const config = buildVmConfig(input);
    expect(config.net).toBeUndefined();
    expect(config.payload.cmdline).not.toMatch(/\bip=/);
    expect(schema?.checkRequest('PUT', '/vm.create', config) ?? []).toEqual([]);
  });
});

describe('contract: hybrid vsock connector', () => {
  let dir: string;
  const servers: Server[] = [];
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'chv-'));
  });
  afterAll(() => {
    for (const s of servers) s.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** A unix socket server that reads the `CONNECT <port>` line and lets `onConnect` answer. */
  async function vsockServer(name: string, onConnect: (line: string, socket: Socket) => void): Promise<string> {
    const path = join(dir, name);
    const server = createServer((socket) => {
      let buffered = '';
      const onData = (chunk: Buffer) => {
        buffered += chunk.toString('latin1');
        const newline = buffered.indexOf('\n');
        if (newline < 0) return;
        socket.off('data', onData);
        onConnect(buffered.slice(0, newline), socket);
      };
      socket.on('data', onData);
      socket.on('error', () => {});
    });
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(path, resolve));
    return path;
  }

  it('contract: CONNECT 1024 answered OK gives a plain byte stream, bytes sent right after the OK line included', async () => {
    const path = await vsockServer('echo.sock', (line, socket) => {
      if (line !== 'CONNECT 1024') return socket.destroy();
      // The OK line and the guest's first bytes in one write: the connector must not eat them.
      socket.write('OK 1073741824\nHELLO');
      socket.on('data', (d) => socket.write(d));
    });
    const stream = await connectHybridVsock(path, 1024, { timeoutMs: 2000 });
    let received = '';
    stream.on('data', (d: Buffer) => (received += d.toString()));
    stream.write('ping');
    await expect.poll(() => received, { timeout: 2000 }).toBe('HELLOping');
    stream.destroy();
  });

  it('contract: a connection closed without a reply (nothing listens on the guest port) is a clear error', async () => {
    const path = await vsockServer('closed.sock', (_line, socket) => socket.end());
    await expect(connectHybridVsock(path, 1024, { timeoutMs: 2000 })).rejects.toThrow(/CONNECT 1024 .*closed without a reply/);
  });

  it('contract: a reply other than "OK <port>" is refused, quoting the reply', async () => {
    const path = await vsockServer('garbled.sock', (_line, socket) => socket.write('ERR no such port\n'));
    await expect(connectHybridVsock(path, 1024, { timeoutMs: 2000 })).rejects.toThrow(/refused, the VMM answered "ERR no such port"/);
    const binary = await vsockServer('binary.sock', (_line, socket) => socket.write(Buffer.alloc(300, 0xff)));
    await expect(connectHybridVsock(binary, 1024, { timeoutMs: 2000 })).rejects.toThrow(/not a line/);
  });

  it('contract: no reply within the timeout is an error naming the timeout', async () => {
    const path = await vsockServer('silent.sock', () => {});
    await expect(connectHybridVsock(path, 1024, { timeoutMs: 150 })).rejects.toThrow(/no reply within 150 ms/);
  });

  it('contract: a missing socket says the VMM is not listening', async () => {
    await expect(connectHybridVsock(join(dir, 'nothing.sock'), 1024, { timeoutMs: 500 })).rejects.toThrow(/VMM is not listening \(ENOENT\)/);
  });
});

/**
 * The fake cloud-hypervisor: answers the API endpoints the driver uses with cloud-hypervisor's
 * state rules (pause only when running, snapshot only when paused, …), records every request,
 * and once booted plays the guest behind the hybrid vsock socket: `CONNECT 1024` → `OK …`, the
 * agent's token line (token read from the config disk, as the guest does) → `OK`, then answers
 * `GET /ready`. A config disk whose env has FAKE_AGENT_NOT_READY makes /ready answer 503.
 */
function fakeCloudHypervisorScript(recordFile: string): string {
  return `#!${process.execPath}
import { createServer } from 'node:http';
import net from 'node:net';
import fs from 'node:fs';
import crypto from 'node:crypto';
const RECORD = ${JSON.stringify(recordFile)};
const apiSocket = process.argv[process.argv.indexOf('--api-socket') + 1];
let state = null;
let config = null;
let vsock = null;
const record = (entry) => fs.appendFileSync(RECORD, JSON.stringify(entry) + '\\n');
const guestConfig = () => JSON.parse(fs.readFileSync(config.disks[2].path, 'utf8').replace(/\\0+$/, ''));
function listenVsock() {
  const guest = guestConfig();
  const hmac = (message) => crypto.createHmac('sha256', guest.token).update(message).digest('hex');
  vsock = net.createServer((s) => {
    let buf = '';
    let stage = 'connect';
    const agentNonce = crypto.randomBytes(16).toString('hex');
    s.on('error', () => {});
    s.on('data', (d) => {
      buf += d.toString('latin1');
      for (;;) {
        if (stage === 'http') {
          const end = buf.indexOf('\\r\\n\\r\\n');
          if (end < 0) return;
          const head = buf.slice(0, end);
          // A restore tells the guest its new name and address (the agent's POST /identity).
          if (head.startsWith('POST /identity HTTP/1.1')) {
            s.end('HTTP/1.1 204 No Content\\r\\nConnection: close\\r\\n\\r\\n');
            return;
          }
          const ready = head.startsWith('GET /ready HTTP/1.1') && !guest.env.FAKE_AGENT_NOT_READY;
          s.end(ready ? 'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok' : 'HTTP/1.1 503 Service Unavailable\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n');
          return;
        }
        const nl = buf.indexOf('\\n');
        if (nl < 0) return;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (stage === 'connect') {
          if (line !== 'CONNECT 1024' || state !== 'Running') return s.destroy();
          s.write('OK 1073741824\\n');
          // The agent's half of the handshake (shared/guest-protocol.ts), as the guest does it.
          s.write('VOIDRUN-AGENT-CHALLENGE ' + agentNonce + '\\n');
          stage = 'handshake';
        } else {
          const [word, proof, hostNonce] = line.split(' ');
          if (word !== 'VOIDRUN-AGENT' || proof !== hmac('host:' + agentNonce) || !hostNonce) return s.destroy();
          s.write('OK ' + hmac('agent:' + hostNonce) + '\\n');
          stage = 'http';
        }
      }
    });
  });
  vsock.listen(config.vsock.socket);
}
function closeVsock() {
  if (vsock) vsock.close();
  vsock = null;
}
const server = createServer((req, res) => {
  let body = '';
  req.on('data', (c) => (body += c));
  req.on('end', () => {
    const endpoint = req.url.replace(/^\\/api\\/v1/, '');
    const parsed = body ? JSON.parse(body) : null;
    record({ method: req.method, path: endpoint, body: parsed, pid: process.pid });
    const ok = (json) => {
      res.writeHead(json ? 200 : 204, json ? { 'Content-Type': 'application/json' } : {});
      res.end(json ? JSON.stringify(json) : undefined);
    };
    const fail = (status, message) => {
      res.writeHead(status);
      res.end(message + '\\n');
    };
    switch (req.method + ' ' + endpoint) {
      case 'GET /vmm.ping': return ok({ version: 'v48.0-fake', pid: process.pid });
      case 'PUT /vm.create':
        if (config) return fail(500, 'Error creating VM: VmAlreadyCreated');
        config = parsed; state = 'Created'; return ok();
      case 'PUT /vm.boot':
        if (!config) return fail(404, 'Error booting VM: VmNotCreated');
        state = 'Running'; listenVsock(); return ok();
      case 'PUT /vm.pause':
        if (state !== 'Running') return fail(405, 'Error pausing VM: InvalidStateTransition(' + state + ', Paused)');
        state = 'Paused'; return ok();
      case 'PUT /vm.resume':
        if (state !== 'Paused') return fail(405, 'Error resuming VM: InvalidStateTransition(' + state + ', Running)');
        state = 'Running'; return ok();
      case 'PUT /vm.shutdown':
        if (!config) return fail(404, 'Error shutting down VM: VmNotCreated');
        state = 'Shutdown'; closeVsock(); return ok();
      case 'PUT /vm.delete': config = null; state = null; closeVsock(); return ok();
      case 'GET /vm.info':
        if (!config) return fail(404, 'Error getting VM info: VmNotCreated');
        return ok({ config, state });
      case 'PUT /vm.snapshot': {
        if (state !== 'Paused') return fail(405, 'Error snapshotting VM: VmNotPaused');
        const dir = new URL(parsed.destination_url).pathname;
        fs.writeFileSync(dir + '/config.json', JSON.stringify(config));
        fs.writeFileSync(dir + '/state.json', JSON.stringify({ fake: true }));
        fs.writeFileSync(dir + '/memory-ranges', Buffer.alloc(4096, 7));
        return ok();
      }
      case 'PUT /vm.restore': {
        if (config) return fail(404, 'Error restoring VM: VmAlreadyCreated');
        const dir = new URL(parsed.source_url).pathname;
        config = JSON.parse(fs.readFileSync(dir + '/config.json', 'utf8'));
        if (!fs.existsSync(dir + '/memory-ranges')) return fail(400, 'Error restoring VM: no memory');
        state = 'Paused'; listenVsock(); return ok();
      }
      case 'PUT /vmm.shutdown':
        closeVsock(); ok(); server.close(); setTimeout(() => process.exit(0), 5); return;
      default: return fail(404, 'unknown endpoint');
    }
  });
});
server.listen(apiSocket);
process.on('SIGTERM', () => process.exit(0));
`;
}

/**
 * In-memory stand-in for the host network (a fake: the real one, network/vm-network.ts, is tested
 * with a real VM in qemu-sandboxes.test.ts): records addresses, TAPs, their source guards and
 * firewall rules instead of making them, and when each was put in place.
 */
class InMemoryNetworkFake implements VmHostNetwork {
  readonly addresses = new Map<string, GuestAddress>();
  readonly taps = new Set<string>();
  /** What each TAP may send (the source check): by TAP. */
  readonly guards = new Map<string, { ip: string; mac: string }>();
  /** The firewall's rules: by sandbox. */
  readonly firewall = new Map<string, { ip: string; hostIf: string; policy: NetworkPolicy }>();
  /** How many VMM API calls had been made when each attach finished (the VM must not run yet). */
  readonly callsAtAttach: number[] = [];
  readonly counters = new Map<string, NetworkBytes>();
  reconciled: { attached: string[]; leased: string[] } | null = null;
  #next = 2;

  constructor(private readonly callsSoFar: () => number) {}

  async attach(id: string, guest: { mac: string; policy: NetworkPolicy }): Promise<VmAttachment> {
    let address = this.addresses.get(id);
    if (!address) this.addresses.set(id, (address = { ip: `10.99.0.${this.#next++}`, prefixLength: 24, gateway: '10.99.0.1' }));
    const tap = this.tapNameFor(id);
    this.taps.add(tap);
    this.guards.set(tap, { ip: address.ip, mac: guest.mac });
    this.firewall.set(id, { ip: address.ip, hostIf: tap, policy: guest.policy });
    this.callsAtAttach.push(this.callsSoFar());
    return { tap, address };
  }
  async detach(id: string): Promise<void> {
    const tap = this.tapNameFor(id);
    this.firewall.delete(id);
    this.guards.delete(tap);
    this.taps.delete(tap);
  }
  async release(id: string): Promise<void> {
    await this.detach(id);
    this.addresses.delete(id);
  }
  async leaseOf(id: string): Promise<string | null> {
    return this.addresses.get(id)?.ip ?? null;
  }
  async bytesOf(id: string): Promise<NetworkBytes | null> {
    return this.taps.has(this.tapNameFor(id)) ? (this.counters.get(id) ?? { egress: 0, ingress: 0 }) : null;
  }
  async reconcile(keep: { attached: ReadonlySet<string>; leased: ReadonlySet<string> }): Promise<string[]> {
    this.reconciled = { attached: [...keep.attached].sort(), leased: [...keep.leased].sort() };
    return [];
  }
  tapNameFor(id: string): string {
    return `vr${id.slice(-12)}`;
  }
}


type Recorded = { method: string; path: string; body: unknown; pid: number };

describe('contract: CloudHypervisorDriver against a fake cloud-hypervisor (the real binary cannot run here: no KVM)', () => {
  let dir: string;
  let instancesDir: string;
  let recordFile: string;
  let network: InMemoryNetworkFake;
  let driver: CloudHypervisorDriver;
  let options: CloudHypervisorDriverOptions;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'chd-'));
    instancesDir = join(dir, 'instances');
    recordFile = join(dir, 'requests.jsonl');
    const binary = join(dir, 'fake-cloud-hypervisor.mjs');
    writeFileSync(binary, fakeCloudHypervisorScript(recordFile));
    chmodSync(binary, 0o755);
    const agentDisk = join(dir, 'agent.img');
    writeFileSync(agentDisk, 'agent disk');
    network = new InMemoryNetworkFake(() => recorded().length);
    options = {
      binary,
      instancesDir,
      image: async (name: string) => vmImagePaths(join(dir, 'base-images'), name),
      agentDisk: async () => agentDisk,
      network,
      writeConfigDisk: async (path: string, config: GuestConfig) => writeFileSync(path, JSON.stringify(config) + '\0'.repeat(64), { mode: 0o600 }),
      createOverlay: async (base: string, overlay: string, sizeMb: number) => writeFileSync(overlay, `qcow2 overlay over ${base}, ${sizeMb} MiB`),
      agentReadyTimeoutMs: 3000,
      stopTimeoutMs: 1000,
      log: pino({ level: 'silent' }),
    };
    driver = new CloudHypervisorDriver(options);
  });

  afterAll(async () => {
    for (const id of [ID_A, ID_B, ID_FAILING]) await driver?.destroy(id).catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  });

  const recorded = (): Recorded[] => (existsSync(recordFile) ? readFileSync(recordFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Recorded) : []);
  /** The state-changing calls, in order (pings and info queries left out). */
  const lifecycleCalls = (from = 0) =>
    recorded()
      .slice(from)
      .filter((r) => r.method === 'PUT')
      .map((r) => r.path);
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.startsWith('Z');
    } catch {
      return false;
    }
  };

  it('contract: available() names the missing binary in one actionable line', async () => {
    const missing = new CloudHypervisorDriver({ ...options, binary: join(dir, 'no-such-binary') });
    const availability = await missing.available();
    expect(availability.ok).toBe(false);
    expect(availability.reason).toContain(join(dir, 'no-such-binary'));
    expect(availability.reason).not.toContain('\n');
  });

  it('contract: create → pause → resume → stop → start → destroy issue the right API calls and leave nothing behind; the TAP has its firewall rules and source check before the VM is created', async () => {
    const spec = sandboxSpec(ID_A, { network: DENY_POLICY });
    const p = vmInstancePaths(instancesDir, ID_A);

    const callsBefore = recorded().length;
    await driver.create(spec);
    expect(lifecycleCalls()).toEqual(['/vm.create', '/vm.boot']);
    const created = recorded().find((r) => r.path === '/vm.create')!;
    const createBody = created.body as { vsock: { socket: string }; payload: { kernel: string } };
    expect(createBody.vsock.socket).toBe(p.vsockSocket);
    expect(createBody.payload.kernel).toBe(vmImagePaths(join(dir, 'base-images'), 'debian').vmlinux);
    expect(readFileSync(p.overlay, 'utf8')).toBe(`qcow2 overlay over ${vmImagePaths(join(dir, 'base-images'), 'debian').baseDisk}, 2048 MiB`);
    expect(statSync(p.dir).mode & 0o777).toBe(0o700);
    expect(statSync(join(p.dir, 'agent.token')).mode & 0o777).toBe(0o600);
    expect(network.addresses.get(ID_A)).toBeDefined();
    expect(network.taps.has(network.tapNameFor(ID_A))).toBe(true);
    // The address the sandbox record reports as `ip`.
    expect(await driver.addressOf(ID_A)).toBe(network.addresses.get(ID_A)!.ip);
    const guest = JSON.parse(readFileSync(p.configDisk, 'utf8').replace(/\0+$/, '')) as GuestConfig;
    // DNS goes to the gateway (the server's resolver, which answers by the sandbox's policy).
    expect(guest).toMatchObject({
      hostname: spec.name,
      env: { GREETING: 'hi' },
      network: { address: network.addresses.get(ID_A)!.ip, prefixLength: 24, gateway: '10.99.0.1', mac: macForSandbox(ID_A) },
      nameservers: ['10.99.0.1'],
    });
    // The firewall has the sandbox's policy under its address and TAP, and the TAP may send only
    // from the guest's MAC and address — both before the VMM was even asked to create the VM.
    const tap = network.tapNameFor(ID_A);
    expect(network.firewall.get(ID_A)).toEqual({ ip: network.addresses.get(ID_A)!.ip, hostIf: tap, policy: DENY_POLICY });
    expect(network.guards.get(tap)).toEqual({ ip: network.addresses.get(ID_A)!.ip, mac: macForSandbox(ID_A) });
    expect((createBody as unknown as { net: Array<{ tap: string; mac: string }> }).net).toEqual([{ id: 'eth0', tap, mac: macForSandbox(ID_A) }]);
    const createIndex = recorded().findIndex((r, i) => i >= callsBefore && r.path === '/vm.create');
    expect(network.callsAtAttach.at(-1)).toBeLessThanOrEqual(createIndex);
    // Bytes come from the host's side of the TAP, never from the guest.
    network.counters.set(ID_A, { egress: 1234, ingress: 5678 });
    expect(await driver.networkBytes(ID_A)).toEqual({ egress: 1234, ingress: 5678 });
    expect((await driver.hostUsage(ID_A))?.network).toEqual({ egress: 1234, ingress: 5678 });
    // After a restart the server keeps the TAPs of VMs that still run, and every recorded sandbox's address.
    await driver.reconcileHost(new Set([ID_A, ID_B]));
    expect(network.reconciled).toEqual({ attached: [ID_A], leased: [ID_A, ID_B].sort() });
    expect(await driver.inspect(ID_A)).toBe('running');
    expect(await driver.list()).toEqual([ID_A]);

    // connect() hands back a stream that speaks HTTP to the agent (past both handshakes).
    const stream = await driver.connect(ID_A);
    let answer = '';
    stream.on('data', (d: Buffer) => (answer += d.toString()));
    stream.write('GET /ready HTTP/1.1\r\nHost: agent\r\n\r\n');
    await expect.poll(() => answer, { timeout: 2000 }).toMatch(/^HTTP\/1\.1 200 OK/);
    stream.destroy();

    const before = recorded().length;
    await driver.pause(ID_A);
    expect(await driver.inspect(ID_A)).toBe('paused');
    // cloud-hypervisor's refusal reaches the caller with its status and message.
    await expect(driver.pause(ID_A)).rejects.toThrow(/PUT \/vm\.pause answered 405: Error pausing VM: InvalidStateTransition\(Paused, Paused\)$/);
    await driver.resume(ID_A);
    expect(await driver.inspect(ID_A)).toBe('running');
    const firstVmm = recorded()[0]!.pid;
    await driver.stop(ID_A);
    expect(lifecycleCalls(before)).toEqual(['/vm.pause', '/vm.pause', '/vm.resume', '/vm.shutdown', '/vmm.shutdown']);
    expect(await driver.inspect(ID_A)).toBe('stopped');
    expect(alive(firstVmm)).toBe(false);
    // Stopped: off the bridge (TAP, guard and rules gone), its address kept for the next start.
    expect(network.taps.has(network.tapNameFor(ID_A))).toBe(false);
    expect(network.guards.size).toBe(0);
    expect(network.firewall.size).toBe(0);
    expect(await driver.networkBytes(ID_A)).toBeNull();
    expect(await driver.addressOf(ID_A)).toBe(network.addresses.get(ID_A)!.ip);
    expect(existsSync(p.overlay)).toBe(true);
    expect(await driver.list()).toEqual([ID_A]);

    const beforeStart = recorded().length;
    await driver.start(spec);
    expect(lifecycleCalls(beforeStart)).toEqual(['/vm.create', '/vm.boot']);
    expect(await driver.inspect(ID_A)).toBe('running');
    expect(network.firewall.get(ID_A)?.policy).toEqual(DENY_POLICY);
    const secondVmm = recorded().at(-1)!.pid;
    expect(secondVmm).not.toBe(firstVmm);

    const beforeDestroy = recorded().length;
    await driver.destroy(ID_A);
    expect(lifecycleCalls(beforeDestroy)).toEqual(['/vmm.shutdown']);
    expect(alive(secondVmm)).toBe(false);
    expect(existsSync(p.dir)).toBe(false);
    expect(network.addresses.has(ID_A)).toBe(false);
    expect(network.taps.size).toBe(0);
    expect(network.guards.size).toBe(0);
    expect(network.firewall.size).toBe(0);
    expect(await driver.inspect(ID_A)).toBe('missing');
    expect(await driver.list()).toEqual([]);
    await driver.destroy(ID_A); // idempotent
  });

  it('contract: a sandbox with network mode none boots without a NIC: no TAP, no address, no rules, no network in its guest config', async () => {
    const p = vmInstancePaths(instancesDir, ID_B);
    const callsBefore = recorded().length;
    await driver.create(sandboxSpec(ID_B, { network: { ...DENY_POLICY, mode: 'none' } }));
    const createBody = recorded().slice(callsBefore).find((r) => r.path === '/vm.create')!.body as { net?: unknown; payload: { cmdline: string } };
    expect(createBody.net).toBeUndefined();
    expect(createBody.payload.cmdline).not.toMatch(/\bip=/);
    expect(network.taps.size).toBe(0);
    expect(network.firewall.size).toBe(0);
    expect(await driver.addressOf(ID_B)).toBeNull();
    expect(await driver.networkBytes(ID_B)).toBeNull();
    const guest = JSON.parse(readFileSync(p.configDisk, 'utf8').replace(/\0+$/, '')) as GuestConfig;
    expect(guest.network).toBeUndefined();
    expect(guest.nameservers).toBeUndefined();
    await driver.destroy(ID_B);
    expect(await driver.list()).toEqual([]);
  });

  it('contract: a create whose agent never becomes ready undoes everything (VMM, TAP, address, directory)', async () => {
    const before = recorded().length;
    await expect(driver.create(sandboxSpec(ID_FAILING, { envVars: { FAKE_AGENT_NOT_READY: '1' } }))).rejects.toThrow(/agent did not answer within 3000 ms \(GET \/ready answered 503\)/);
    const pids = new Set(recorded().slice(before).map((r) => r.pid));
    expect(pids.size).toBe(1);
    for (const pid of pids) expect(alive(pid)).toBe(false);
    expect(existsSync(vmInstancePaths(instancesDir, ID_FAILING).dir)).toBe(false);
    expect(network.addresses.has(ID_FAILING)).toBe(false);
    expect(network.taps.size).toBe(0);
    expect(network.firewall.size).toBe(0);
  });

  it('contract: snapshot pauses, captures memory and disks, resumes; restore brings a new sandbox up from it with the agent answering', async () => {
    await driver.create(sandboxSpec(ID_A));
    const file = join(dir, 'a.snapshot.tar.gz');
    const before = recorded().length;
    await driver.snapshot(ID_A, file);
    expect(lifecycleCalls(before)).toEqual(['/vm.pause', '/vm.snapshot', '/vm.resume']);
    const snapshotCall = recorded().find((r) => r.path === '/vm.snapshot')!;
    expect((snapshotCall.body as { destination_url: string }).destination_url).toMatch(new RegExp(`^file://${instancesDir}/${ID_A}/snapshot-[0-9a-f-]+/vm$`));
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const entries = execFileSync('tar', ['-tzf', file], { encoding: 'utf8' }).split('\n');
    expect(entries).toEqual(expect.arrayContaining(['./vm/config.json', './vm/state.json', './vm/memory-ranges', './overlay.qcow2', './config.img', './agent.token']));
    expect(await driver.inspect(ID_A)).toBe('running');
    // The staging directory is gone from the instance.
    expect(execFileSync('ls', [vmInstancePaths(instancesDir, ID_A).dir], { encoding: 'utf8' })).not.toMatch(/snapshot-/);

    const beforeRestore = recorded().length;
    await driver.restore(sandboxSpec(ID_B), file);
    expect(lifecycleCalls(beforeRestore)).toEqual(['/vm.restore', '/vm.resume']);
    const b = vmInstancePaths(instancesDir, ID_B);
    const restoreCall = recorded().find((r) => r.path === '/vm.restore')!;
    expect(restoreCall.body).toEqual({ source_url: `file://${b.dir}/restore/vm` });
    expect(await driver.inspect(ID_B)).toBe('running');
    // The restored VM runs on B's files: the fake took its vsock socket and config disk from the
    // rebased config.json, and the agent answered through them.
    expect(readFileSync(join(b.dir, 'agent.token'), 'utf8')).toBe(readFileSync(join(vmInstancePaths(instancesDir, ID_A).dir, 'agent.token'), 'utf8'));
    expect(network.taps.has(network.tapNameFor(ID_B))).toBe(true);
    // The restored guest keeps the NIC it was captured with (its memory holds that MAC): B's TAP
    // admits that MAC with B's own address, under B's firewall rules.
    expect(network.guards.get(network.tapNameFor(ID_B))).toEqual({ ip: network.addresses.get(ID_B)!.ip, mac: macForSandbox(ID_A) });
    expect(network.firewall.get(ID_B)).toMatchObject({ ip: network.addresses.get(ID_B)!.ip, hostIf: network.tapNameFor(ID_B) });
    expect(existsSync(join(b.dir, 'restore'))).toBe(false);
    const stream = await driver.connect(ID_B);
    stream.destroy();

    await driver.destroy(ID_A);
    await driver.destroy(ID_B);
    expect(await driver.list()).toEqual([]);
    expect(network.taps.size).toBe(0);
    expect(network.addresses.size).toBe(0);
    expect(network.firewall.size).toBe(0);
  });

  it.skipIf(!specPresent)('contract: every request the driver sent to the fake is in cloud-hypervisor’s API and its body validates against the schema', () => {
    const requests = recorded();
    expect(new Set(requests.map((r) => r.path))).toEqual(
      new Set(['/vmm.ping', '/vm.create', '/vm.boot', '/vm.info', '/vm.pause', '/vm.resume', '/vm.shutdown', '/vmm.shutdown', '/vm.snapshot', '/vm.restore']),
    );
    // vm.create twice (create, start) plus the failed create, vm.snapshot and vm.restore: bodies really were checked.
    expect(requests.filter((r) => r.body !== null).length).toBeGreaterThanOrEqual(5);
    const errors = requests.flatMap((r) => schema!.checkRequest(r.method, r.path, r.body));
    expect(errors).toEqual([]);
  });
});
