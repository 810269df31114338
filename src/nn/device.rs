//! Where a pass runs and with which kernels: the device (`--device cpu|cuda|cuda:N|auto`), the
//! precision of the frozen weights (`--dtype f32|bf16|f16`), and the kernel set.
//!
//! Two kernel sets implement every op of the forward and backward passes:
//! - [`Kernels::Fast`]: the CPU kernels with hand-written backward passes (the fused ops of
//!   `nn`, flat-buffer optimizers and auxiliary losses); CPU and f32 only.
//! - [`Kernels::Generic`]: candle's tensor ops and autograd on whatever device holds the
//!   tensors, plus [`crate::nn::linear::FrozenLinear`]'s device matmul. This is what runs on a
//!   GPU; on the CPU it runs behind the internal switch `WAKE2VEC_KERNELS=generic` (and the
//!   library's [`Compute::generic_on_cpu`]) so that its numerics are tested without a GPU.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The device a user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA device `N` (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first CUDA device when the build has CUDA and one is present, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            "auto" => DeviceSpec::Auto,
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => bail!("device '{other}' is not one of cpu, cuda, cuda:N (N = 0, 1, …), auto"),
            },
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Opens the device: one line naming the fix when this build or machine has no CUDA.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if cfg!(feature = "cuda") {
                    Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
                } else {
                    Ok(Device::Cpu)
                }
            }
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device {self}: this wake2vec was built without CUDA; rebuild it with `cargo build --release --features cuda` on a machine with the CUDA toolkit (README, \"GPU\"), or use --device cpu"
                    );
                }
                Device::new_cuda(n).map_err(|e| {
                    let reason = format!("{e}").lines().next().unwrap_or("").to_string();
                    anyhow::anyhow!(
                        "--device {self}: no usable CUDA device {n} on this machine ({reason}); check `nvidia-smi`, or use --device cpu"
                    )
                })
            }
        }
    }
}

/// The precision of the frozen weights on the generic path. Products accumulate in f32; norms,
/// softmax, the loss, trainable rows, adapters and optimizer state are f32 whatever this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    /// bfloat16 (Ampere and later GPUs; CPUs through candle's bf16 matmul).
    Bf16,
    /// float16 (the T4's Turing).
    F16,
}

impl WeightDtype {
    /// candle's dtype.
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }

    /// The option's spelling.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }
}

impl FromStr for WeightDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "f32" => WeightDtype::F32,
            "bf16" => WeightDtype::Bf16,
            "f16" => WeightDtype::F16,
            other => bail!("dtype '{other}' is not one of f32, bf16, f16"),
        })
    }
}

/// Which implementation of the ops a pass uses; chosen once, when the model is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fused CPU kernels (f32).
    #[default]
    Fast,
    /// candle's ops and autograd on any device.
    Generic,
}

/// The device, the frozen weights' precision and the kernels a model runs with.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: WeightDtype,
    pub kernels: Kernels,
}

impl Default for Compute {
    fn default() -> Self {
        Self::cpu()
    }
}

impl Compute {
    /// The CPU with the fast kernels, f32.
    pub fn cpu() -> Self {
        Compute {
            device: Device::Cpu,
            dtype: WeightDtype::F32,
            kernels: Kernels::Fast,
        }
    }

    /// The CPU running the generic kernels: what a GPU runs, minus the CUDA kernels themselves.
    pub fn generic_on_cpu(dtype: WeightDtype) -> Self {
        Compute {
            device: Device::Cpu,
            dtype,
            kernels: Kernels::Generic,
        }
    }

    /// Opens `spec` with frozen weights in `dtype`. A GPU, or weights other than f32, run the
    /// generic kernels; so does the CPU when `WAKE2VEC_KERNELS=generic` is set.
    pub fn open(spec: DeviceSpec, dtype: WeightDtype) -> Result<Self> {
        let device = spec.open()?;
        let kernels = if device.is_cpu() && dtype == WeightDtype::F32 && !generic_forced()? {
            Kernels::Fast
        } else {
            Kernels::Generic
        };
        Ok(Compute {
            device,
            dtype,
            kernels,
        })
    }

    /// How the device is named in run records: `cpu`, `cuda:N`.
    pub fn device_name(&self) -> String {
        device_name(&self.device)
    }

    /// A one-line description: `cuda:0, bf16 weights, generic kernels`.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} weights, {} kernels",
            self.device_name(),
            self.dtype.name(),
            match self.kernels {
                Kernels::Fast => "fast CPU",
                Kernels::Generic => "generic",
            }
        )
    }
}

/// True when `WAKE2VEC_KERNELS=generic` asks the CPU for the generic kernels (tests use it to
/// run on the CPU what a GPU runs).
pub fn generic_forced() -> Result<bool> {
    Ok(match std::env::var("WAKE2VEC_KERNELS") {
        Ok(v) if v == "generic" => true,
        Ok(v) if v == "fast" || v.is_empty() => false,
        Ok(v) => bail!("WAKE2VEC_KERNELS={v}: expected `fast` or `generic` (or unset it)"),
        Err(_) => false,
    })
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses a `--device` value, naming the option in the error.
pub fn parse_device(s: &str) -> Result<DeviceSpec> {
    s.parse().context("--device")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for (s, want) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("auto", DeviceSpec::Auto),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), want);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("cpu, cuda, cuda:N"), "{e}");
        }
        assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
        assert!("fp8".parse::<WeightDtype>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_one_clear_line() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"));
        assert!(!e.contains('\n'));
        assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
    }

    #[test]
    fn the_cpu_at_f32_gets_the_fast_kernels_anything_else_the_generic_ones() {
        if std::env::var_os("WAKE2VEC_KERNELS").is_some() {
            return;
        }
        let c = Compute::open(DeviceSpec::Cpu, WeightDtype::F32).unwrap();
        assert_eq!(c.kernels, Kernels::Fast);
        let c = Compute::open(DeviceSpec::Cpu, WeightDtype::Bf16).unwrap();
        assert_eq!(c.kernels, Kernels::Generic);
        assert_eq!(c.describe(), "cpu, bf16 weights, generic kernels");
    }
}
