// The replication handshake, mutual challenge–response with the pre-shared key, over a fresh Link
// (frames authenticated with the hello key). On success both directions switch to the session key.
// Any failure refuses the peer (REJECT with the reason) and closes the link.

import { randomBytes } from 'node:crypto';
import { RubatoError } from '../util/index.ts';
import type { Link } from './link.ts';
import {
  FrameType,
  REJECT_TAG_BYTES,
  frameTypeName,
  proof,
  proofEquals,
  rejectTag,
  sessionKeys,
} from './protocol/frame.ts';
import {
  NONCE_BYTES,
  decodeChallenge,
  decodeHello,
  decodeWelcome,
  encodeChallenge,
  encodeHello,
  encodeWelcome,
  type Identity,
  type Welcome,
} from './protocol/messages.ts';

/** Until the session's layout is known (BASE_BEGIN), frames carry at most one base chunk. */
export const SESSION_START_MAX_FRAME_BYTES = 4 << 20;
/**
 * What a primary accepts from its standby after the handshake: acknowledgements and control, and
 * (compare mode) the secondary's output in batches of at most SEC_OUT_MAX_BATCH_BYTES, each of
 * which holds at least one whole network frame (up to 64 KiB with offloads).
 */
export const STANDBY_MAX_FRAME_BYTES = 256 << 10;
export const SEC_OUT_MAX_BATCH_BYTES = 128 << 10;

/** Standby side: challenge, check the primary's proof, welcome with our proof. */
/**
 * Standby side. `admit` may refuse an authenticated primary (its reason goes back in a REJECT):
 * e.g. one whose witness generation is older than one this standby has seen.
 */
export async function acceptHandshake(
  link: Link,
  psk: Buffer,
  welcome: (id: Identity) => Welcome,
  timeoutMs: number,
  admit?: (id: Identity) => string | null,
): Promise<Identity> {
  const nonceS = randomBytes(NONCE_BYTES);
  await link.send(FrameType.CHALLENGE, 0, encodeChallenge(nonceS));
  const f = await link.next(timeoutMs);
  if (f.type !== FrameType.HELLO) throw refuse(link, `expected HELLO, got ${frameTypeName(f.type)}`);
  const h = decodeHello(f.payload);
  if (!proofEquals(h.proof, proof(psk, 'primary', nonceS, h.nonce))) {
    // (it decrypted under the key: a HELLO of another session, replayed; not bound, nothing to bind to)
    throw refuse(link, 'a HELLO that does not answer this challenge (replayed?)', 'RUBATO_AUTH_FAILED');
  }
  const generation = h.identity.generation ?? 0;
  if ((f.generation ?? 0) !== generation)
    throw refuse(link, `the HELLO frame carries generation ${f.generation ?? 0}, its identity ${generation}`);
  // The session's fencing token: every frame from here on, both ways (a REJECT too), carries it.
  link.bindGeneration(generation);
  const refusal = admit?.(h.identity) ?? null;
  if (refusal !== null) throw refuse(link, refusal, 'RUBATO_PROTOCOL', { psk, nonceP: h.nonce });
  const keys = sessionKeys(psk, nonceS, h.nonce);
  await link.send(FrameType.WELCOME, 0, encodeWelcome(proof(psk, 'standby', h.nonce, nonceS), welcome(h.identity)));
  // The primary sends nothing between HELLO and our WELCOME: everything after is session-keyed.
  link.setSendKey(keys[link.sends]);
  link.setReceiveKey(keys[link.receives]);
  link.setMaxFrameBytes(SESSION_START_MAX_FRAME_BYTES);
  return h.identity;
}

/** Primary side: answer the challenge, check the standby's proof. */
export async function connectHandshake(
  link: Link,
  psk: Buffer,
  identity: Identity,
  timeoutMs: number,
): Promise<Welcome> {
  const f = await link.next(timeoutMs);
  if (f.type !== FrameType.CHALLENGE) throw refuse(link, `expected CHALLENGE, got ${frameTypeName(f.type)}`);
  const nonceS = decodeChallenge(f.payload);
  const nonceP = randomBytes(NONCE_BYTES);
  link.bindGeneration(identity.generation ?? 0);
  await link.send(FrameType.HELLO, 0, encodeHello(nonceP, proof(psk, 'primary', nonceS, nonceP), identity));
  const keys = sessionKeys(psk, nonceS, nonceP);
  // The standby's WELCOME is the last hello-keyed frame; what follows it is session-keyed.
  link.setReceiveKeyAfterNext(keys[link.receives]);
  const w = await link.next(timeoutMs).catch((e: unknown) => {
    throw link.rejected ? rejection(link, link.rejected, psk, nonceP) : e;
  });
  if (w.type !== FrameType.WELCOME) throw refuse(link, `expected WELCOME, got ${frameTypeName(w.type)}`);
  const d = decodeWelcome(w.payload);
  if (!proofEquals(d.proof, proof(psk, 'standby', nonceP, nonceS)))
    throw refuse(link, 'the standby failed to prove it holds the key', 'RUBATO_AUTH_FAILED');
  link.setSendKey(keys[link.sends]);
  // The standby sends acks, heartbeats, fences: small frames only.
  link.setMaxFrameBytes(STANDBY_MAX_FRAME_BYTES);
  return d.welcome;
}

/**
 * What a REJECT means to the primary that sent `nonceP`: the standby's refusal of this HELLO when
 * it carries the tag of that nonce (the standby holds the key and answered now), else an old or
 * forged REJECT, which only ends this attempt.
 */
function rejection(link: Link, payload: Buffer, psk: Buffer, nonceP: Buffer): RubatoError {
  const reason = payload.subarray(0, Math.max(0, payload.length - REJECT_TAG_BYTES));
  const tag = payload.subarray(reason.length);
  if (tag.length === REJECT_TAG_BYTES && proofEquals(tag, rejectTag(psk, nonceP, reason)))
    return new RubatoError('RUBATO_AUTH_FAILED', `${link.peer} refused the connection: ${reason.toString('utf8')}`, {
      peer: link.peer,
    });
  return new RubatoError(
    'RUBATO_PROTOCOL',
    `${link.peer} sent a REJECT not bound to this attempt (replayed?); trying again`,
    {
      peer: link.peer,
    },
  );
}

function refuse(
  link: Link,
  reason: string,
  code: 'RUBATO_PROTOCOL' | 'RUBATO_AUTH_FAILED' = 'RUBATO_PROTOCOL',
  bind?: { psk: Buffer; nonceP: Buffer },
): RubatoError {
  const err = new RubatoError(code, `handshake with ${link.peer}: ${reason}`, { peer: link.peer });
  const text = Buffer.from(reason);
  const payload = bind ? Buffer.concat([text, rejectTag(bind.psk, bind.nonceP, text)]) : text;
  link.send(FrameType.REJECT, 0, payload, { flushed: true }).then(
    () => link.close(err),
    () => link.close(err),
  );
  return err;
}
