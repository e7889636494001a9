import { describe, expect, it } from 'vitest';
import { qemuGuestNetwork, qemuNicArgs, USER_NET } from '../server/hypervisor/qemu/nics.js';

const nic = { tap: 'vr0718293a4b5c', mac: '02:11:22:33:44:55', address: { ip: '10.215.7.9', prefixLength: 24, gateway: '10.215.7.1' } };

describe("a qemu sandbox's NICs (pure)", () => {
  it('network none: the user-mode NIC only, restricted, forwarding host loopback to the agent; the guest routes through it', () => {
    expect(qemuNicArgs(40123, null)).toEqual(['-netdev', 'user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40123-:1024', '-device', `virtio-net-pci,netdev=net0,mac=${USER_NET.mac}`]);
    expect(qemuGuestNetwork(null)).toEqual({ network: { address: '10.0.2.15', prefixLength: 24, gateway: '10.0.2.2', mac: USER_NET.mac } });
  });

  it('bridge: a second virtio NIC on the TAP with the sandbox MAC, holding the lease, the default route and DNS via the gateway; the user-mode NIC keeps only its subnet', () => {
    expect(qemuNicArgs(40123, nic).slice(4)).toEqual(['-netdev', 'tap,id=net1,ifname=vr0718293a4b5c,script=no,downscript=no', '-device', 'virtio-net-pci,netdev=net1,mac=02:11:22:33:44:55']);
    expect(qemuGuestNetwork(nic)).toEqual({
      network: { address: '10.215.7.9', prefixLength: 24, gateway: '10.215.7.1', mac: '02:11:22:33:44:55' },
      extraNetworks: [{ address: '10.0.2.15', prefixLength: 24, mac: USER_NET.mac }],
      nameservers: ['10.215.7.1'],
    });
  });
});
