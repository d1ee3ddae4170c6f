//! The module ABI and its sandbox. A module exports:
//!
//! - `memory`: its linear memory;
//! - `alloc(len: i32) -> i32`: room for `len` bytes of input, at the returned offset;
//! - `decide(ptr: i32, len: i32) -> i64`: reads a MessagePack map `{event, attributes, state,
//!   policies}` at `ptr`, and returns where its answer is: `(offset << 32) | length` of a
//!   MessagePack map, the state patch (`action`, `reasons`, `target_peer`, ...);
//! - optionally `validate(ptr: i32, len: i32) -> i64`: gets one policy document and answers
//!   `{}` when it is valid, or `{error: "..."}`.
//!
//! It imports nothing: the host gives no function, no clock, no I/O. Every call runs in a new
//! instance, so nothing leaks from one event to the next, with a fuel budget (an endless loop
//! is an error, not a hung host) and a memory cap.
//!
//! wasmi, not wasmtime: an interpreter with fuel metering that builds in seconds where
//! wasmtime's compiler takes minutes on two cores, and a policy decision is a few thousand
//! instructions, where instantiation, not execution speed, dominates (docs/wasm.md, WebAssembly
//! agents).

use wasmi::{Config, Engine, ExternType, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};

/// A decision's answer may be this large at most: what the dispatcher takes from an agent
/// (`--max-patch-bytes`' default).
const MAX_OUTPUT: usize = 512 * 1024;
/// Table entries a module may have (function pointers); a module needs a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// A policy's `validate` runs on the agent's receive loop (policy loads and `_validate`
/// requests), so it gets at most this much fuel, whatever `--fuel` says.
pub const VALIDATE_FUEL: u64 = 1_000_000;

/// What a module may use in one call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Fuel units (about one per instruction) per call.
    pub fuel: u64,
    /// Bytes its memory may grow to.
    pub max_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 10_000_000,
            max_memory: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("not a loadable WebAssembly module (binary or text): {0}")]
    Invalid(String),
    #[error("the module imports `{module}.{name}`: the ABI gives a module no imports")]
    Imports { module: String, name: String },
    #[error("the module does not export {0}")]
    Missing(&'static str),
    #[error(
        "the module ran out of fuel ({0} units): an endless loop, or too much work for one call"
    )]
    OutOfFuel(u64),
    #[error("the module trapped: {0}")]
    Trap(String),
    #[error("the module's answer is out of its memory or larger than 512 KiB")]
    Output,
}

/// A module checked against the ABI, ready to call, with its own engine: wasmi keeps a
/// module's compiled code in its engine until the engine is dropped, so a host that shared one
/// engine would keep every version it ever loaded or checked.
#[derive(Debug, Clone)]
pub struct Compiled {
    engine: Engine,
    module: Module,
    /// Whether it exports `validate`.
    pub validates: bool,
}

/// How modules are compiled and run: the limits of every call.
#[derive(Debug, Clone)]
pub struct Sandbox {
    config: Config,
    limits: Limits,
}

fn is_func(ty: &ExternType, params: usize, result: wasmi::ValType) -> bool {
    match ty {
        ExternType::Func(f) => {
            f.params().len() == params
                && f.params().iter().all(|p| *p == wasmi::ValType::I32)
                && f.results() == [result]
        }
        _ => false,
    }
}

impl Sandbox {
    pub fn new(limits: Limits) -> Self {
        let mut config = Config::default();
        config.consume_fuel(true);
        // One memory, so that the memory cap is the module's whole memory (the cap applies to
        // each memory of a module).
        config.wasm_multi_memory(false);
        Sandbox { config, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Parses and checks a module: WebAssembly binary or text, no imports, the ABI's exports.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, AbiError> {
        let engine = Engine::new(&self.config);
        let module = Module::new(&engine, bytes).map_err(|e| AbiError::Invalid(e.to_string()))?;
        if let Some(i) = module.imports().next() {
            return Err(AbiError::Imports {
                module: i.module().to_string(),
                name: i.name().to_string(),
            });
        }
        let export = |name: &str| {
            module
                .exports()
                .find(|e| e.name() == name)
                .map(|e| e.ty().clone())
        };
        use wasmi::ValType::{I32, I64};
        if !matches!(export("memory"), Some(ExternType::Memory(_))) {
            return Err(AbiError::Missing("a memory named `memory`"));
        }
        if !export("alloc").is_some_and(|t| is_func(&t, 1, I32)) {
            return Err(AbiError::Missing("`alloc(len: i32) -> i32`"));
        }
        if !export("decide").is_some_and(|t| is_func(&t, 2, I64)) {
            return Err(AbiError::Missing("`decide(ptr: i32, len: i32) -> i64`"));
        }
        let validates = match export("validate") {
            None => false,
            Some(t) if is_func(&t, 2, I64) => true,
            Some(_) => return Err(AbiError::Missing("`validate(ptr: i32, len: i32) -> i64`")),
        };
        Ok(Compiled {
            engine,
            module,
            validates,
        })
    }

    /// Instantiates the module once, as every call will: a start function that loops or
    /// traps, or an initial memory over the cap, shows here rather than on every event.
    pub fn instantiate(&self, compiled: &Compiled) -> Result<(), AbiError> {
        let mut store = self.store(compiled, self.limits.fuel)?;
        Linker::<StoreLimits>::new(&compiled.engine)
            .instantiate_and_start(&mut store, &compiled.module)
            .map(drop)
            .map_err(|e| self.trap(e, self.limits.fuel))
    }

    fn store(&self, compiled: &Compiled, fuel: u64) -> Result<Store<StoreLimits>, AbiError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory)
            .memories(1)
            .tables(1)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(1)
            .build();
        let mut store = Store::new(&compiled.engine, limits);
        store.limiter(|l: &mut StoreLimits| l);
        store.set_fuel(fuel).map_err(|e| self.trap(e, fuel))?;
        Ok(store)
    }

    fn trap(&self, e: wasmi::Error, fuel: u64) -> AbiError {
        match e.as_trap_code() {
            Some(wasmi::TrapCode::OutOfFuel) => AbiError::OutOfFuel(fuel),
            _ => AbiError::Trap(e.to_string()),
        }
    }

    /// Calls `export` (`decide` or `validate`) with `input` in a new instance; its answer.
    pub fn call(
        &self,
        compiled: &Compiled,
        export: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, AbiError> {
        let fuel = match export {
            "validate" => self.limits.fuel.min(VALIDATE_FUEL),
            _ => self.limits.fuel,
        };
        let mut store = self.store(compiled, fuel)?;
        let trap = |e: wasmi::Error| self.trap(e, fuel);
        let instance = Linker::<StoreLimits>::new(&compiled.engine)
            .instantiate_and_start(&mut store, &compiled.module)
            .map_err(trap)?;
        let memory = instance
            .get_memory(&store, "memory")
            .ok_or(AbiError::Missing("a memory named `memory`"))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&store, "alloc")
            .map_err(|_| AbiError::Missing("`alloc(len: i32) -> i32`"))?;
        let len = i32::try_from(input.len()).map_err(|_| AbiError::Output)?;
        let at = alloc.call(&mut store, len).map_err(trap)?;
        let at = usize::try_from(at)
            .map_err(|_| AbiError::Trap("alloc returned a negative offset".into()))?;
        memory
            .write(&mut store, at, input)
            .map_err(|_| AbiError::Trap(format!("alloc returned {at}, outside its memory")))?;
        let func = instance
            .get_typed_func::<(i32, i32), i64>(&store, export)
            .map_err(|_| AbiError::Missing("the called function"))?;
        let packed = func.call(&mut store, (at as i32, len)).map_err(trap)? as u64;
        let (offset, length) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        if length > MAX_OUTPUT {
            return Err(AbiError::Output);
        }
        let mut out = vec![0; length];
        memory
            .read(&store, offset, &mut out)
            .map_err(|_| AbiError::Output)?;
        Ok(out)
    }
}
