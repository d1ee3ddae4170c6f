;; Agent kind `geo`, version 2: denies, and says so in a reason (agent geo, policy v2).
;; It answers every event with the same patch, MessagePack written out below:
;; {"action": "deny", "reasons": [{"agent": "geo", "policy": "v2", "effect": "deny"}]}
(module
  (memory (export "memory") 1)
  ;; A bump allocator: each call runs in a new instance, so nothing is ever freed.
  (global $next (mut i32) (i32.const 4096))
  (func (export "alloc") (param $len i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    ;; Grow the memory to fit, a page (64 KiB) at a time; past the host's cap it stays -1.
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (global.get $next) (i32.mul (memory.size) (i32.const 65536))))
        (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $grow)))
    (local.get $at))
  (data (i32.const 1024) "\82\a6\61\63\74\69\6f\6e\a4\64\65\6e\79\a7\72\65\61\73\6f\6e\73\91\83\a5\61\67\65\6e\74\a3\67\65\6f\a6\70\6f\6c\69\63\79\a2\76\32\a6\65\66\66\65\63\74\a4\64\65\6e\79")
  (func (export "decide") (param $ptr i32) (param $len i32) (result i64)
    ;; (offset << 32) | length of the answer.
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 55)))
)
