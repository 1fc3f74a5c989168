//! Federated learning for agentmesh: models, local training, robust aggregation
//! and differential privacy. Pure computation: no networking, no async; the
//! node crate moves the bytes.
//!
//! - Data ([`Dataset`], [`Standardizer`], [`partition`], [`write_shards`]): CSV
//!   with the label last, errors that name line and column; the bundled UCI
//!   digits set ([`Dataset::digits`], CC BY 4.0); IID or Dirichlet(α) shards.
//! - Models ([`Model`], [`Architecture`], [`Sgd`]): softmax regression and ReLU
//!   MLPs as one flat `f32` vector; safetensors files with the architecture in
//!   the metadata, validated on load ([`Model::load`], [`load_update`]).
//! - Training ([`Trainer`]): the built-in [`LocalTrainer`] (SGD with momentum,
//!   optionally example-level DP-SGD) or an [`ExternalTrainer`] that runs a
//!   user's program over a documented file protocol.
//! - Aggregation ([`validate`], [`Aggregator`]): updates are validated first
//!   (length, finiteness, example count) and rejected with a reason; then
//!   FedAvg, Krum, Multi-Krum, trimmed mean, median or Bulyan, each checking its
//!   preconditions and reporting which updates it used.
//! - Privacy ([`clip_l2`], [`DpConfig`], [`RdpAccountant`], [`PrivacyBudget`],
//!   [`AdaptiveClipping`]): clipping, Gaussian noise, and an RDP accountant for
//!   the Poisson-subsampled Gaussian mechanism that agrees with Google's
//!   `dp-accounting`.
//! - Testing ([`Attack`], [`simulate`]): Byzantine update generators and an
//!   in-process simulation of whole federated runs.
//!
//! # Usage
//!
//! ```
//! use agentmesh_federated::{
//!     partition, validate, Aggregator, Architecture, Dataset, LocalTrainer, Model, Partition,
//!     Standardizer, TrainConfig, Trainer, Update,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut train, mut test) = Dataset::digits()?.split(0.2, 0)?;
//! let scaler = Standardizer::fit(&train);
//! scaler.apply(&mut train)?;
//! scaler.apply(&mut test)?;
//! let shards = partition(&train, 5, Partition::dirichlet(0.5), 0)?;
//!
//! let arch = Architecture::Mlp { inputs: 64, hidden: vec![32], classes: 10 };
//! let mut global = Model::new(arch, 0)?;
//! let config = TrainConfig { epochs: 1, learning_rate: 0.05, momentum: 0.9, ..TrainConfig::default() };
//! for _round in 0..3 {
//!     let mut updates = Vec::new();
//!     for shard in &shards {
//!         let out = LocalTrainer.train(&global, shard, &config)?;
//!         updates.push(Update::new(out.delta, out.examples));
//!     }
//!     // Wrong-length or non-finite updates would be listed in `rejected`.
//!     let checked = validate(updates, global.params().len());
//!     assert!(checked.rejected.is_empty());
//!     let round = Aggregator::Median.aggregate(&checked.accepted)?;
//!     global.apply_delta(&round.delta)?;
//! }
//! assert!(global.evaluate(&test)?.accuracy > 0.8);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod aggregate;
mod attack;
mod checkpoint;
mod data;
mod model;
mod npy;
mod partition;
mod privacy;
mod report;
mod simulate;
mod trainer;

pub use aggregate::{
    validate, Aggregate, AggregateError, Aggregator, Mixed, Mixing, RejectReason, Rejection,
    Update, ValidUpdates, Validated,
};
pub use attack::{alie_z_max, Attack};
pub use checkpoint::{
    decode as decode_params, encode as encode_params, load_update, save_update, CheckpointError,
    Content, MAX_MODEL_FILE_SIZE,
};
pub use data::{DataError, Dataset, Standardizer, MAX_CLASSES, MAX_FEATURES};
pub use model::{
    Architecture, Evaluation, Model, ModelError, Sgd, TensorSpec, MAX_HIDDEN_LAYERS, MAX_PARAMS,
};
pub use npy::{read_npy, write_npy, NpyError, MAX_NPY_ELEMENTS};
pub use partition::{partition, write_shards, Partition};
pub use privacy::{
    add_gaussian_noise, clip_l2, default_orders, epsilon_from_rdp, l2_norm, poisson_gaussian_rdp,
    AccountantError, AdaptiveClipping, DpConfig, NoiseMode, PrivacyBudget, PrivacyError,
    RdpAccountant,
};
pub use report::{
    digits_report, AttackResult, AttackSummary, CentralRow, PrivacyRow, Report, ReportConfig,
    ReportError, RobustRow, RobustSummary,
};
pub use simulate::{simulate, Attackers, RoundMetrics, SimulationConfig, SimulationError};
pub use trainer::{
    DpSgd, ExternalTrainer, LocalTrainer, TrainConfig, TrainError, TrainOutput, Trainer,
    EXTERNAL_PROTOCOL_VERSION, MAX_RESULT_SIZE,
};
