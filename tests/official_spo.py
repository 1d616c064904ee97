"""Transcription of the official SPO (Segment Policy Optimization, arXiv 2505.23564) advantage code, used only as a
test oracle.

Source: repository ``AIFrameResearch/SPO``, commit ``b9fc6a263dec54e28137fd488a9b9c0e0d026025`` (2025-07-26,
"Add Qwen2.5-1.5B-Base config"). See ../../shared/specs/finegrained-estimators.md §8.

SPO-chain, ``src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py``
(class ``MathEpisodeGeneratorWithMCAdvantages``):

* ``add_cutpoints``: the cut-point loop of ``_create_value_estimation_requests``, lines 916-934 (p = exp(actor
  log-prob) of each response token; candidates p < 0.9; cut point = candidate - 1; every ``cutpoint_interval``-th).
* ``_compute_mc_value``: lines 505-536, verbatim.
* ``_update_trajectories_w_values``: the value-storing core of lines 278-333 (one value-estimation result per
  (trajectory, cut point)).
* ``_compute_token_advantages``: lines 347-477, verbatim (incl. the probability-mask zeroing of tokens with
  p > 0.9, lines 437-439).

SPO-tree:

* ``_construct_tree``: ``src/treetune/inference_strategies/hybrid_inference_strategy.py`` lines 333-424 (node value
  ``reward`` = ``np.mean`` of the children's rewards, ``reward_std`` = ``np.std``), and ``_convert_tree_to_string``
  lines 426-429.
* ``extract_edges_from_tree``: ``src/treetune/episode_generators/tree_episode_generator.py`` lines 112-179,
  verbatim (``adv_method`` "rloo" / "grpo", the drop of edges with ``advantage + prover_advantage == 0`` under
  ``only_adv_greater_than_zero``).
* ``edges_from_tree_string``: ``src/treetune/episode_generators/hybrid_episode_generator.py`` lines 187-195 (the
  tree JSON is parsed, then ``extract_edges_from_tree``); every token of an edge takes the edge's ``advantage``
  (``_compute_token_advantages`` there, lines 655-658; no probability mask in the tree episode builder).

Stripped (and only this): vLLM / guidance generation (the test passes pre-generated children through a stand-in
``node_expander``), tokenisation and query-text reconstruction, ``datasets`` I/O, distributed sharding and
request deduplication, metrics and cloud logging, the replay buffer. In ``_compute_token_advantages`` the unused
reads of ``query_text``, ``response_text``, ``offsets``, ``query_token_ids`` and the commented-out code were dropped;
``_construct_tree`` keeps its asyncio structure. Float conventions are the official ones: Python floats / numpy
float64, ``np.mean`` / ``np.std`` (population), ``np.exp`` of the stored log-probs, eps ``1e-8``. Nothing is
vectorized or fixed (``base == None`` is kept as is).
"""

import asyncio
import copy
import json

import numpy as np


class MathEpisodeGeneratorWithMCAdvantages:
    """The SPO-chain pieces of the official class; ``reward_function`` is an object with ``__call__(query, response,
    data_instance) -> (reward, is_unfinished)`` and ``get_unfinished_response_penalty()``."""

    def __init__(self, reward_function=None, cutpoint_interval=5):
        self.reward_function = reward_function
        self.cutpoint_interval = cutpoint_interval

    def add_cutpoints(self, trajectories):
        # math_episode_generator_with_mc_advantages.py lines 916-934
        # Add cutpoints to the trajectories
        num_cutpoints = []

        for traj_idx, traj in enumerate(trajectories):
            logprobs = traj["actor_shifted_log_probs"]
            query_tokens = traj["query_token_ids"]
            response_tokens = traj["response_token_ids"]
            assert len(logprobs) == len(query_tokens) + len(response_tokens) - 1
            response_logprobs = logprobs[len(query_tokens) - 1 :]
            assert len(response_logprobs) == len(response_tokens)
            response_probs = np.exp(response_logprobs)
            cutpoints = np.where(response_probs < 0.9)[0] # TODO: Change 0.9 to a parameter
            cutpoints = cutpoints - 1 # Real cutpoints, sample position
            cutpoints = cutpoints[::self.cutpoint_interval]
            num_cutpoints.append(len(cutpoints))
            traj["cutpoints"] = cutpoints
            traj["cutpoints_values"] = [None] * len(cutpoints)
            traj["cutpoints_values_std"] = [None] * len(cutpoints)
            traj["response_prob"] = response_probs

        return trajectories

    def _update_trajectories_w_values(self, trajectories, value_estimation_results):
        # lines 278-333, without the text sanity checks and metrics
        for res in value_estimation_results:
            data_instance = res["data_instance"]

            traj_idx = res["traj_idx"]
            value_idx = res["value_idx"]

            value, value_std, rewards = self._compute_mc_value(
                query=res["query"],
                value_estimation_result=res,
                data_instance=data_instance,
                return_rewards=True,
            )

            assert trajectories[traj_idx]["cutpoints_values"][value_idx] is None
            trajectories[traj_idx]["cutpoints_values"][value_idx] = value
            trajectories[traj_idx]["cutpoints_values_std"][value_idx] = value_std

        return trajectories

    def _compute_token_advantages(
        self,
        trajectory,
    ):
        # lines 347-477
        response_token_ids = trajectory["response_token_ids"]

        token_values = [None] * len(response_token_ids)
        token_values_std = [None] * len(response_token_ids)
        advantages = [None] * len(response_token_ids)

        score = trajectory["score"]
        token_values[-1] = score
        token_values_std[-1] = 0

        # assert trajectory["cutpoints"][0] == 0
        # base = trajectory["cutpoints_values"][0]

        base = None
        cutpoints = trajectory["cutpoints"]
        cutpoints_values = trajectory["cutpoints_values"]
        cutpoints_values_std = trajectory["cutpoints_values_std"]
        response_prob = trajectory["response_prob"]

        if len(cutpoints) == 0:
            token_values = [score] * len(response_token_ids)
            advantages = [0] * len(response_token_ids)
            return token_values, advantages

        if cutpoints[0] == -1:
            base = cutpoints_values[0]
            cutpoints = cutpoints[1:]
            cutpoints_values = cutpoints_values[1:]
            cutpoints_values_std = cutpoints_values_std[1:]

        for idx, value, value_std in zip(cutpoints, cutpoints_values, cutpoints_values_std):
            # assert value is not None
            token_values[idx] = value
            token_values_std[idx] = value_std

        for i in range(len(token_values)):
            if token_values[i] is not None:
                if base == None:  # noqa: E711 (verbatim)
                    advantages[i] = 0
                else:
                    advantages[i] = token_values[i] - base
                base = token_values[i]

        for i in range(len(token_values) - 1, -1, -1):
            if advantages[i] is None:
                advantages[i] = advantages[i + 1]

        for i in range(len(token_values)):
            if response_prob[i] > 0.9:
                advantages[i] = 0

        # noinspection PyTypeChecker
        return token_values, advantages

    def _compute_mc_value(
        self,
        *,
        query: str = None,
        value_estimation_result=None,
        data_instance=None,
        return_rewards: bool = False,
    ):
        # lines 505-536, verbatim
        # noinspection DuplicatedCode
        tree = json.loads(value_estimation_result["_treetune__reasoning_tree"])
        rollouts = [(c["answer"], c["finish_reason"]) for c in tree["children"]]

        rewards = [
            (
                self.reward_function(query, rol, data_instance)[0]
                if finish_reason != "length"
                else self.reward_function.get_unfinished_response_penalty()
            )
            for rol, finish_reason in rollouts
        ]

        if len(rewards) == 0:
            mc_value = 0.0
            mc_std = -1 # Set to -1 to indentify this
        else:
            mc_value = np.mean(rewards)
            mc_std = np.std(rewards)

        if return_rewards:
            return mc_value, mc_std, rewards

        return mc_value, mc_std


class HybridInferenceStrategy:
    """``_construct_tree`` of the official class; ``node_expander.expand(current_node=, prefix=, depth=,
    max_tokens=)`` is awaited and returns the children (dicts with ``text``, ``depth``, ``full_text``,
    ``stop_text``, ``finish_reason``); ``reward_function(query=, response=, dataset_instance=)`` returns
    ``(reward, is_unfinished)``."""

    def __init__(self, node_expander, reward_function, M=100):
        self.node_expander = node_expander
        self.reward_function = reward_function
        self.M = M

    async def _construct_tree(
        self,
        initial_prompt: str,
        max_depth: int = 2,
        data_instance=None,
    ):
        # hybrid_inference_strategy.py lines 333-424
        # First, we create the root node
        tree = {
            "text": initial_prompt,
            "depth": 0,
            "full_text": initial_prompt,
            # `stop_text` is not used for the root node,
            # but we set it to some random string Milad said.
            "stop_text": "aaa", # not used
            # We only store the data instance in the root node
            # to cover the cases where node_expander or answer_extractor
            # needs it
            "_request_object": data_instance,
            "leaf": False
        }

        async def dfs(node, prefix: str, depth: int) -> None:
            if depth == max_depth:
                # We have reached the max_depth and we have not finished reasoning, this means that the model output is too long (exceed the model context length) that we have to truncate that
                node["reward"], _ = self.reward_function(
                    query=prefix,
                    response=node["text"],
                    dataset_instance=data_instance
                )
                node["leaf"] = True
                return

            max_tokens = None if depth == max_depth - 1 else self.M # we segment every M tokens, but for the last step, we let it free

            children = await self.node_expander.expand(
                current_node=node,
                prefix=prefix,
                depth=depth,
                max_tokens=max_tokens,
            )

            node["children"] = children

            # Either the child has finished (and we need to grade the response)
            # or we need to expand the child further.

            expansion_tasks = []
            for child in children:
                # Check if the child can be produce an answer
                if child["finish_reason"] != "length":
                    # This means we have reached the end of the reasoning chain
                    child["reward"], _ = self.reward_function(
                        query=prefix,
                        response=child["full_text"], # We pass full text here
                        dataset_instance=data_instance)
                    child["leaf"] = True
                else:
                    # This means that the model response has been truncated
                    child["leaf"] = False
                    expansion_tasks.append(
                        asyncio.create_task(dfs(child, child["full_text"], depth + 1))
                    )

            # Wait all the children have got reward
            if expansion_tasks:
                await asyncio.gather(*expansion_tasks)

            child_rewards = [child["reward"] for child in children]

            node["reward"] = np.mean(child_rewards)
            node["reward_std"] = np.std(child_rewards)

        await dfs(tree, initial_prompt, 0)

        # Remove the `_data_instance` field from the tree
        # as it is not needed anymore
        # tree.pop("_request_object", None)

        return tree

    def construct_tree(self, initial_prompt, max_depth=2, data_instance=None):
        """Synchronous entry point (``generate`` runs ``_construct_tree`` under ``asyncio.run``)."""
        return asyncio.run(self._construct_tree(initial_prompt, max_depth, data_instance=data_instance))

    def _convert_tree_to_string(self, tree) -> str:
        # lines 426-429
        # @TODO: Perhaps remove full_text to reduce the size of the tree
        tree_str = json.dumps(tree, indent=4, sort_keys=True)
        return tree_str


def extract_edges_from_tree(
    tree,
    adv_method = "rloo",
    only_adv_greater_than_zero = True,
    use_hard_estimation = False
):
    # tree_episode_generator.py lines 112-179 (TreeEpisodeUtils.extract_edges_from_tree), verbatim
    edges = []
    data_instance = tree["_request_object"]
    question_id = data_instance["_treetune__idx"]

    def dfs(node, parent=None):

        def BoK(value, bok=4):
            return 1 - (1 - value) ** bok

        if parent is not None: # For each node in the tree except the root
            query_text = parent["full_text"]
            response_text = node["text"]
            parent_reward = parent["reward"]
            assert "reward_std" in parent
            parent_reward_std = parent["reward_std"]
            child_reward = node["reward"]
            leaf = node["leaf"]
            if adv_method == "rloo":
                advantage = child_reward - parent_reward
            elif adv_method == "grpo":
                advantage = (child_reward - parent_reward) / (parent_reward_std + 1e-8)
            else:
                raise ValueError(f"adv_method {adv_method} is not supported")
            # if parent_reward != 0 and parent_reward != 1: # parent reward = 0 means there is no difference
            # if advantage != 0:
            prover_advantage = BoK(child_reward) - BoK(parent_reward)
            pav_advantage = advantage + prover_advantage
            if only_adv_greater_than_zero:
                if pav_advantage != 0:
                    edges.append({
                    "question_id": question_id,
                    "instance": data_instance,
                    "query_text": query_text,
                    "response_text": response_text,
                    # "advantage": child_reward - parent_reward,
                    "prover_advantage": prover_advantage,
                    "advantage": advantage,
                    "value": child_reward,
                    "leaf": leaf,
                    "reward": child_reward
                })
            else:
                edges.append({
                    "question_id": question_id,
                    "instance": data_instance,
                    "query_text": query_text,
                    "response_text": response_text,
                    "advantage": advantage,
                    "prover_advantage": prover_advantage,
                    "value": child_reward,
                    "leaf": leaf,
                    "reward": child_reward
                })
        for child in node.get("children", []):
            dfs(child, node)
        node.pop("children", None)

    tree_copy = copy.deepcopy(tree)
    dfs(tree_copy)
    edges = json.loads(json.dumps(edges))
    return edges


def edges_from_tree_string(tree_str, adv_method="rloo", only_adv_greater_than_zero=True):
    # hybrid_episode_generator.py lines 187-195 (one tree)
    tree = json.loads(tree_str)
    edges = extract_edges_from_tree(tree,
                                    adv_method=adv_method,
                                    only_adv_greater_than_zero=only_adv_greater_than_zero,
                                    use_hard_estimation=False)
    return edges
