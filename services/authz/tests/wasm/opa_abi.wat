;; A policy module implementing OPA's WebAssembly ABI 1.2, written by hand
;; because no `opa` compiler is available to the tests. It decides like a
;; tiny Rego policy would:
;;
;;   decision = {"allow": true, ...}  if input.subject.roles[0] == "admin"
;;   decision = {"allow": false, ...} otherwise
;;   spin: never returns (a runaway policy, for the fuel limit)
;;
;; Values are kept as the JSON text itself: opa_json_parse returns the
;; address of the text, opa_json_dump returns it back (NUL-terminated,
;; because the bump allocator hands out zeroed memory with a spare byte).
(module
  (import "env" "memory" (memory 2))
  (import "env" "opa_abort" (func $opa_abort (param i32)))

  (global (export "opa_wasm_abi_version") i32 (i32.const 1))
  (global (export "opa_wasm_abi_minor_version") i32 (i32.const 2))
  ;; The heap starts at the second page; the first holds the constants.
  (global $heap (mut i32) (i32.const 65536))

  (data (i32.const 16) "{}\00")
  (data (i32.const 32) "{\"k8shell/authz/decision\":0,\"spin\":1}\00")
  (data (i32.const 128) "[{\"result\":{\"allow\":true,\"reasons\":[\"admins reach everything\"],\"obligations\":{\"record\":\"true\"}}}]\00")
  (data (i32.const 512) "[{\"result\":{\"allow\":false,\"reasons\":[\"only admins (wasm test policy)\"]}}]\00")
  ;; The needle searched for in the input, 16 bytes.
  (data (i32.const 1024) "\"roles\":[\"admin\"")

  (func $malloc (export "opa_malloc") (param $size i32) (result i32)
    (local $at i32)
    (local $end i32)
    (local.set $at (global.get $heap))
    ;; One spare zero byte, 8-byte aligned.
    (local.set $end
      (i32.and
        (i32.add (i32.add (local.get $at) (local.get $size)) (i32.const 8))
        (i32.const -8)))
    ;; Grow when the allocation runs past the memory.
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.add
                  (i32.div_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536))
                  (i32.const 1)))
              (i32.const -1))
          (then (call $opa_abort (i32.const 0)) (unreachable)))))
    (global.set $heap (local.get $end))
    (local.get $at))

  (func (export "opa_free") (param i32))
  (func (export "opa_json_parse") (param $text i32) (param $len i32) (result i32) (local.get $text))
  (func (export "opa_json_dump") (param $value i32) (result i32) (local.get $value))
  (func (export "opa_heap_ptr_get") (result i32) (global.get $heap))
  (func (export "opa_heap_ptr_set") (param $at i32) (global.set $heap (local.get $at)))
  (func (export "builtins") (result i32) (i32.const 16))
  (func (export "entrypoints") (result i32) (i32.const 32))

  ;; The slow path (ABI 1.0) exists but is never taken by 1.2 callers.
  (func (export "opa_eval_ctx_new") (result i32) (i32.const 0))
  (func (export "opa_eval_ctx_set_input") (param i32 i32))
  (func (export "opa_eval_ctx_set_data") (param i32 i32))
  (func (export "opa_eval_ctx_set_entrypoint") (param i32 i32))
  (func (export "opa_eval_ctx_get_result") (param i32) (result i32) (i32.const 512))
  (func (export "eval") (param i32) (result i32) (i32.const 0))

  ;; 1 when the 16-byte needle occurs in [$at, $at + $len).
  (func $contains_admin (param $at i32) (param $len i32) (result i32)
    (local $i i32)
    (local $j i32)
    (local.set $i (i32.const 0))
    (block $done
      (loop $scan
        (br_if $done (i32.gt_s (i32.add (local.get $i) (i32.const 16)) (local.get $len)))
        (local.set $j (i32.const 0))
        (block $mismatch
          (loop $compare
            (br_if $mismatch
              (i32.ne
                (i32.load8_u (i32.add (i32.add (local.get $at) (local.get $i)) (local.get $j)))
                (i32.load8_u (i32.add (i32.const 1024) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (if (i32.eq (local.get $j) (i32.const 16)) (then (return (i32.const 1))))
            (br $compare)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (i32.const 0))

  ;; The fast path: input is JSON text at $input, $len bytes long.
  (func (export "opa_eval")
    (param $reserved i32) (param $entrypoint i32) (param $data i32)
    (param $input i32) (param $len i32) (param $heap_ptr i32) (param $format i32)
    (result i32)
    (if (i32.eq (local.get $entrypoint) (i32.const 1))
      (then (loop $forever (br $forever))))
    (if (result i32) (call $contains_admin (local.get $input) (local.get $len))
      (then (i32.const 128))
      (else (i32.const 512))))
)
