// Agent kind `peer-deny`: denies an event whose `src_peer` attribute one of its policies lists.
//
//   {agent: peer-deny, id: block-untrusted, peers: [peer-x, peer-y]}
//
// The policy-bus WebAssembly ABI: export `memory`, `alloc`, `decide` and (optionally)
// `validate`, and import nothing. The host runs every call in a fresh instance, so memory is
// handed out by the stub runtime's bump allocator and never freed.

import { Reader, Writer } from "./msgpack";

const AGENT = "peer-deny";
const PEERS_ERROR = "field `peers`: missing or not a list of strings";

// Stands in for the default `env.abort` import (`--use abort=assembly/index/abort`), which
// the host would refuse: the ABI gives a module no imports. A failed check becomes a trap,
// and the host reports the trap as the agent's error. Not exported on purpose.
function abort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  unreachable();
}

/** Room for `len` bytes of input, which the host writes there before calling us. */
export function alloc(len: i32): i32 {
  return <i32>heap.alloc(<usize>len);
}

/**
 * Reads `{event, attributes, state, policies}` and answers `{action, reasons}`: deny, citing
 * the first policy whose `peers` lists `attributes.src_peer`, or allow.
 */
export function decide(ptr: i32, len: i32): i64 {
  const r = new Reader(ptr, len);
  const entries = r.mapLen();
  if (entries < 0) unreachable(); // the host always sends a map

  // The host may write the keys in any order, and `policies` can only be judged once
  // `src_peer` is known: note where both values start, then come back to them.
  let attributesAt: usize = 0;
  let policiesAt: usize = 0;
  for (let i: i64 = 0; i < entries; i++) {
    if (r.str()) {
      if (r.strIs("attributes")) attributesAt = r.pos;
      else if (r.strIs("policies")) policiesAt = r.pos;
    } else {
      r.skip(); // a key that is not a string names nothing we read
    }
    r.skip();
  }

  // An absent, or non-string, `src_peer` matches no policy: the event is allowed.
  let peerPtr: usize = 0;
  let peerLen: usize = 0;
  let hasPeer = false;
  if (attributesAt != 0) {
    r.pos = attributesAt;
    const n = r.mapLen();
    if (n >= 0 && findKey(r, n, "src_peer") && r.str()) {
      hasPeer = true;
      peerPtr = r.strPtr;
      peerLen = r.strLen;
    }
  }

  if (hasPeer && policiesAt != 0) {
    r.pos = policiesAt;
    const count = r.arrayLen();
    for (let i: i64 = 0; i < count; i++) {
      // Looking into a policy leaves the reader somewhere inside it: find where the next
      // one starts first, by skipping this one whole.
      const start = r.pos;
      r.skip();
      const next = r.pos;
      r.pos = start;
      if (listsPeer(r, peerPtr, peerLen)) {
        r.pos = start;
        return deny(r, peerPtr, peerLen);
      }
      r.pos = next;
    }
  }
  return allow();
}

/**
 * Checks one policy document: `{}` when `peers` is a list of strings, else `{error}`. The host
 * checks `agent` and `id` itself; `peers` is the only field this kind adds.
 */
export function validate(ptr: i32, len: i32): i64 {
  const r = new Reader(ptr, len);
  const w = new Writer();
  if (peersValid(r)) {
    w.mapHeader(0);
  } else {
    w.mapHeader(1);
    w.str("error");
    w.str(PEERS_ERROR);
  }
  return w.finish();
}

/**
 * Reads the keys of a map whose header (`entries` entries) was just read, up to `key`; true
 * with the reader on its value, or false with the reader past the map.
 */
function findKey(r: Reader, entries: i64, key: string): bool {
  for (let i: i64 = 0; i < entries; i++) {
    if (r.str()) {
      if (r.strIs(key)) return true;
    } else {
      r.skip();
    }
    r.skip();
  }
  return false;
}

/** Whether the policy at the reader lists the peer whose name is at `ptr`. */
function listsPeer(r: Reader, ptr: usize, len: usize): bool {
  const entries = r.mapLen();
  if (entries < 0 || !findKey(r, entries, "peers")) return false;
  const count = r.arrayLen();
  for (let i: i64 = 0; i < count; i++) {
    if (r.str()) {
      if (r.strLen == len && memory.compare(r.strPtr, ptr, len) == 0) return true;
    } else {
      r.skip(); // validate refuses these, but a policy stored under an earlier module may have them
    }
  }
  return false;
}

/** Whether the policy at the reader has a `peers` list of strings only. */
function peersValid(r: Reader): bool {
  const entries = r.mapLen();
  if (entries < 0 || !findKey(r, entries, "peers")) return false;
  const count = r.arrayLen();
  if (count < 0) return false;
  for (let i: i64 = 0; i < count; i++) {
    if (!r.str()) return false;
  }
  return true;
}

/** The deny answer, citing the policy at the reader (by its `id`) and the peer. */
function deny(r: Reader, peerPtr: usize, peerLen: usize): i64 {
  // Every stored policy has a string `id`; an empty one would only mean a malformed policy.
  let idPtr: usize = 0;
  let idLen: usize = 0;
  const entries = r.mapLen();
  if (entries >= 0 && findKey(r, entries, "id") && r.str()) {
    idPtr = r.strPtr;
    idLen = r.strLen;
  }

  const w = new Writer();
  w.mapHeader(2);
  w.str("action");
  w.str("deny");
  w.str("reasons");
  w.arrayHeader(1);
  w.mapHeader(4);
  w.str("agent");
  w.str(AGENT);
  w.str("policy");
  w.strBytes(idPtr, idLen);
  w.str("effect");
  w.str("deny");
  w.str("detail");
  // "peer <src_peer> is denied", assembled in place: the peer's bytes are copied as they came.
  const before = "peer ";
  const after = " is denied";
  w.strHeader(<usize>before.length + peerLen + <usize>after.length);
  w.utf8(before);
  w.bytes(peerPtr, peerLen);
  w.utf8(after);
  return w.finish();
}

/** The allow answer: no policy matched, so the reason cites the kind's default. */
function allow(): i64 {
  const w = new Writer();
  w.mapHeader(2);
  w.str("action");
  w.str("allow");
  w.str("reasons");
  w.arrayHeader(1);
  w.mapHeader(3);
  w.str("agent");
  w.str(AGENT);
  w.str("policy");
  w.str("default");
  w.str("effect");
  w.str("allow");
  return w.finish();
}
