;; Answers with its input, unchanged: the patch then holds `event`, `attributes`, `state` and
;; `policies`, which shows what a module is given.
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
  (func (export "decide") (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))
)
