// Just enough MessagePack for an agent: a reader that walks the host's input in place, and a
// writer for the answer. Strings are never decoded to AssemblyScript strings: the agent only
// compares and copies bytes, which keeps it allocation-free on the input side and sidesteps
// UTF-16 entirely.
//
// Malformed input traps (`unreachable`): the host encodes every input itself, so a bad byte
// is a bug worth surfacing as the agent's error, not something to guess around.

/** Reads MessagePack values from `[pos, end)` of linear memory. */
export class Reader {
  pos: usize;
  end: usize;
  /** The bytes of the string last read by `str()`, still in the input. */
  strPtr: usize = 0;
  strLen: usize = 0;

  constructor(ptr: i32, len: i32) {
    this.pos = <usize>ptr;
    this.end = <usize>ptr + <usize>len;
  }

  // Every read goes through here, so a length that points past the input traps instead of
  // reading whatever happens to lie beyond it.
  private need(n: u64): void {
    if (n > <u64>(this.end - this.pos)) unreachable();
  }

  private advance(n: u64): void {
    this.need(n);
    this.pos += <usize>n;
  }

  private peek(): u32 {
    this.need(1);
    return load<u8>(this.pos);
  }

  private u8(): u32 {
    const v = this.peek();
    this.pos += 1;
    return v;
  }

  // MessagePack is big-endian, WebAssembly little-endian.
  private u16(): u32 {
    this.need(2);
    const v = bswap<u16>(load<u16>(this.pos));
    this.pos += 2;
    return v;
  }

  private u32(): u32 {
    this.need(4);
    const v = bswap<u32>(load<u32>(this.pos));
    this.pos += 4;
    return v;
  }

  /**
   * The entry count if the next value is a map, its header consumed; -1 otherwise, nothing
   * consumed, so the caller can still skip it.
   */
  mapLen(): i64 {
    const b = this.peek();
    if ((b & 0xf0) == 0x80) { this.pos += 1; return b & 0x0f; }
    if (b == 0xde) { this.pos += 1; return this.u16(); }
    if (b == 0xdf) { this.pos += 1; return this.u32(); }
    return -1;
  }

  /** As `mapLen`, for arrays. */
  arrayLen(): i64 {
    const b = this.peek();
    if ((b & 0xf0) == 0x90) { this.pos += 1; return b & 0x0f; }
    if (b == 0xdc) { this.pos += 1; return this.u16(); }
    if (b == 0xdd) { this.pos += 1; return this.u32(); }
    return -1;
  }

  /**
   * If the next value is a string: consumes it, points `strPtr`/`strLen` at its bytes and
   * returns true. Otherwise returns false and consumes nothing.
   */
  str(): bool {
    const b = this.peek();
    let n: u32;
    if ((b & 0xe0) == 0xa0) { this.pos += 1; n = b & 0x1f; }
    else if (b == 0xd9) { this.pos += 1; n = this.u8(); }
    else if (b == 0xda) { this.pos += 1; n = this.u16(); }
    else if (b == 0xdb) { this.pos += 1; n = this.u32(); }
    else return false;
    this.need(n);
    this.strPtr = this.pos;
    this.strLen = <usize>n;
    this.pos += <usize>n;
    return true;
  }

  /** Whether the string last read by `str()` is `ascii` (which must be ASCII: one byte a char). */
  strIs(ascii: string): bool {
    const n = ascii.length;
    if (this.strLen != <usize>n) return false;
    for (let i = 0; i < n; i++) {
      if (<u32>load<u8>(this.strPtr + <usize>i) != <u32>ascii.charCodeAt(i)) return false;
    }
    return true;
  }

  /**
   * Skips one whole value, however nested. A count of values still to skip replaces
   * recursion, so a deeply nested input cannot exhaust the call stack: a container just
   * adds its elements (twice its entries, for a map) to the count.
   */
  skip(): void {
    let pending: u64 = 1;
    while (pending > 0) {
      pending--;
      const b = this.u8();
      if (b <= 0x7f || b >= 0xe0) continue; // positive / negative fixint: no payload
      if ((b & 0xf0) == 0x80) { pending += <u64>(b & 0x0f) * 2; continue; } // fixmap
      if ((b & 0xf0) == 0x90) { pending += <u64>(b & 0x0f); continue; } // fixarray
      if ((b & 0xe0) == 0xa0) { this.advance(b & 0x1f); continue; } // fixstr
      switch (b) {
        case 0xc0: // nil
        case 0xc2: // false
        case 0xc3: // true
          break;
        case 0xc4: // bin8
        case 0xd9: // str8
          this.advance(this.u8()); break;
        case 0xc5: // bin16
        case 0xda: // str16
          this.advance(this.u16()); break;
        case 0xc6: // bin32
        case 0xdb: // str32
          this.advance(this.u32()); break;
        // ext8/16/32: the length does not count the type byte that follows it.
        case 0xc7: this.advance(<u64>this.u8() + 1); break;
        case 0xc8: this.advance(<u64>this.u16() + 1); break;
        case 0xc9: this.advance(<u64>this.u32() + 1); break;
        case 0xcc: case 0xd0: this.advance(1); break; // uint8, int8
        case 0xcd: case 0xd1: this.advance(2); break; // uint16, int16
        case 0xca: case 0xce: case 0xd2: this.advance(4); break; // float32, uint32, int32
        case 0xcb: case 0xcf: case 0xd3: this.advance(8); break; // float64, uint64, int64
        // fixext1/2/4/8/16: a type byte, then 1/2/4/8/16 bytes.
        case 0xd4: this.advance(2); break;
        case 0xd5: this.advance(3); break;
        case 0xd6: this.advance(5); break;
        case 0xd7: this.advance(9); break;
        case 0xd8: this.advance(17); break;
        case 0xdc: pending += <u64>this.u16(); break; // array16
        case 0xdd: pending += <u64>this.u32(); break; // array32
        case 0xde: pending += <u64>this.u16() * 2; break; // map16
        case 0xdf: pending += <u64>this.u32() * 2; break; // map32
        default: unreachable(); // 0xc1, the one byte MessagePack never uses
      }
    }
  }
}

/** Writes MessagePack into a buffer of its own, which grows as needed. */
export class Writer {
  ptr: usize;
  len: usize = 0;
  cap: usize = 256;

  constructor() {
    this.ptr = heap.alloc(this.cap);
  }

  private reserve(n: usize): void {
    if (this.len + n <= this.cap) return;
    while (this.len + n > this.cap) this.cap <<= 1;
    this.ptr = heap.realloc(this.ptr, this.cap);
  }

  private byte(b: u32): void {
    this.reserve(1);
    store<u8>(this.ptr + this.len, <u8>b);
    this.len += 1;
  }

  private be16(v: u32): void {
    this.reserve(2);
    store<u16>(this.ptr + this.len, bswap<u16>(<u16>v));
    this.len += 2;
  }

  private be32(v: u32): void {
    this.reserve(4);
    store<u32>(this.ptr + this.len, bswap<u32>(v));
    this.len += 4;
  }

  mapHeader(entries: u32): void {
    if (entries < 16) this.byte(0x80 | entries);
    else if (entries <= 0xffff) { this.byte(0xde); this.be16(entries); }
    else { this.byte(0xdf); this.be32(entries); }
  }

  arrayHeader(items: u32): void {
    if (items < 16) this.byte(0x90 | items);
    else if (items <= 0xffff) { this.byte(0xdc); this.be16(items); }
    else { this.byte(0xdd); this.be32(items); }
  }

  /** A string header for `bytes` UTF-8 bytes; the caller then writes exactly that many. */
  strHeader(bytes: usize): void {
    if (bytes < 32) this.byte(0xa0 | <u32>bytes);
    else if (bytes <= 0xff) { this.byte(0xd9); this.byte(<u32>bytes); }
    else if (bytes <= 0xffff) { this.byte(0xda); this.be16(<u32>bytes); }
    else { this.byte(0xdb); this.be32(<u32>bytes); }
  }

  /** Raw bytes, e.g. a string's body copied from the input. */
  bytes(ptr: usize, len: usize): void {
    this.reserve(len);
    memory.copy(this.ptr + this.len, ptr, len);
    this.len += len;
  }

  /** The UTF-8 bytes of `s`, without a header: one piece of a string built from several. */
  utf8(s: string): void {
    const n = <usize>String.UTF8.byteLength(s);
    this.reserve(n);
    String.UTF8.encodeUnsafe(changetype<usize>(s), s.length, this.ptr + this.len);
    this.len += n;
  }

  /** A whole string. */
  str(s: string): void {
    this.strHeader(<usize>String.UTF8.byteLength(s));
    this.utf8(s);
  }

  /** A whole string whose UTF-8 bytes are at `ptr` (copied, e.g. from the input). */
  strBytes(ptr: usize, len: usize): void {
    this.strHeader(len);
    this.bytes(ptr, len);
  }

  /** Where the answer is, packed as the ABI wants it: `(offset << 32) | length`. */
  finish(): i64 {
    return (<i64>this.ptr << 32) | <i64>this.len;
  }
}
