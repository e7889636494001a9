import type { GuestConfig } from '../../../shared/guest-protocol.js';
import type { GuestAddress } from '../network/vm-network.js';
import { GUEST_AGENT_PORT } from '../vm/guest.js';

/*
 * A QEMU sandbox's NICs. Always the user-mode NIC (`restrict=on`: it reaches nothing, the host's
 * forward to the agent's port is all it carries); in bridge mode a second virtio NIC on the
 * sandbox's TAP, which has the leased address and the default route. Pure: table-tested.
 */

/** QEMU's user-mode network: the guest's fixed address, the virtual gateway and the NIC's MAC (QEMU's default for a first NIC, set explicitly). */
export const USER_NET = { address: '10.0.2.15', prefixLength: 24, gateway: '10.0.2.2', mac: '52:54:00:12:34:56' } as const;

/** The sandbox's TAP NIC, when it has one. */
export interface TapNic {
  tap: string;
  mac: string;
  address: GuestAddress;
}

/** QEMU's `-netdev`/`-device` arguments: the user-mode NIC forwarding host loopback `agentPort` to the agent, and the TAP NIC. */
export function qemuNicArgs(agentPort: number, nic: TapNic | null): string[] {
  return [
    '-netdev', `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${agentPort}-:${GUEST_AGENT_PORT}`,
    '-device', `virtio-net-pci,netdev=net0,mac=${USER_NET.mac}`,
    ...(nic ? ['-netdev', `tap,id=net1,ifname=${nic.tap},script=no,downscript=no`, '-device', `virtio-net-pci,netdev=net1,mac=${nic.mac}`] : []),
  ];
}

/**
 * What the guest configures: with a TAP NIC, that NIC has the leased address and the default
 * route, the user-mode NIC only its subnet (where the host's forward arrives), and DNS goes to the
 * gateway (the server's resolver answers by the sandbox's policy). Without one, the user-mode NIC
 * is all there is.
 */
export function qemuGuestNetwork(nic: TapNic | null): Pick<GuestConfig, 'network' | 'extraNetworks' | 'nameservers'> {
  if (!nic) return { network: { ...USER_NET } };
  const { gateway: _viaHost, ...userNic } = USER_NET;
  const { address } = nic;
  return {
    network: { address: address.ip, prefixLength: address.prefixLength, gateway: address.gateway, mac: nic.mac },
    extraNetworks: [userNic],
    nameservers: [address.gateway],
  };
}
